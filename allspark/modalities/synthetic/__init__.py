"""Synthetic data with real structure for the ten built-in modalities (pure numpy, deterministic
by seed): rasters and spectra (`imagery`), shapes and walks (`geometry`), tables and traffic
(`records`), reviews and functions (`text`). The built-in modality specs name these generators in
their `DemoTask`; the class names each generator renders are the `demo` preset's label sets."""

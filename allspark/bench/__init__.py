"""allspark.bench: `allspark bench BUILD` — backends side by side, one run, interleaved repetitions."""

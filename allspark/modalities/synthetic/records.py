"""Synthetic records: PRSA-like air-quality rows (table) and METR-LA-like sensor series (graph).

Table: hour, station and wind direction (discrete) and SO2, NO2, CO, O3, temperature, pressure,
dew point, rain, wind speed (continuous) are drawn from a shared latent "stagnation" state, and
PM2.5 follows a known nonlinear rule of the observed columns times log-normal noise.
Graph: one fixed sensor network (two corridors, free-flow speed and rush-hour dips per sensor)
whose speeds follow the time of day and the weekday; incidents cut a sensor's speed and spill
back upstream. The task: the next `horizon` steps of every sensor.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ...model.config import ModalityConfig

Rng = np.random.Generator

# ---- table: PM2.5 --------------------------------------------------------------------------------
DISCRETE_COLUMNS = ("hour", "station", "wind_direction")
CONTINUOUS_COLUMNS = ("SO2", "NO2", "CO", "O3", "TEMP", "PRES", "DEWP", "RAIN", "WSPM")
# Emission level of each station (the 12 PRSA sites): fixed, so stations are learnable categories.
_STATION_FACTOR = np.random.default_rng(12).uniform(0.7, 1.4, 12)


def pm25_rule(co: float, so2: float, wspm: float, spread: float, wind_angle: float, rain: float) -> float:
    """PM2.5 (ug/m3) before noise: combustion (CO) trapped by calm, humid air, worse from the south."""
    south = 0.5 * (1 - np.cos(wind_angle))  # 1 when the wind blows from the south, 0 from the north
    humid = 1 + 1.2 * np.exp(-spread / 3)  # small temperature-dew point spread: humid air
    calm = np.exp(-0.2 * (wspm - 2))
    return float((0.045 * co * calm * humid * (0.7 + 0.6 * south) + 0.8 * so2) * np.exp(-0.25 * rain))


def table(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], np.ndarray]:
    e = mc.encoder
    card = e.cardinalities
    disc = np.array([rng.integers(c) for c in card], dtype=np.int64)
    hour = disc[0] * 24 / card[0] if len(card) > 0 else 12.0
    station = int(disc[1]) if len(card) > 1 else 0
    z = rng.normal()  # stagnation: calm, humid, polluted when high
    angle = (np.pi if z + rng.normal(0, 0.7) > 0 else 0.0) + rng.normal(0, 0.6)
    if len(card) > 2:  # wind direction sector, 0 = north, clockwise
        disc[2] = int(np.round(angle / (2 * np.pi) * card[2])) % card[2]
        angle = disc[2] * 2 * np.pi / card[2]
    temp = 13 - 15 * np.cos(2 * np.pi * rng.uniform(0, 365) / 365) + 4 * np.sin(2 * np.pi * (hour - 9) / 24) + rng.normal(0, 2)
    wspm = np.exp(0.7 - 0.45 * z + rng.normal(0, 0.3))
    spread = np.exp(1.6 - 0.5 * z + rng.normal(0, 0.3))
    rain = rng.exponential(2.0) if rng.random() < 0.08 else 0.0
    traffic = 1 + 0.6 * (np.exp(-(hour - 8) ** 2 / 4) + np.exp(-(hour - 18) ** 2 / 6))
    sf = _STATION_FACTOR[station % 12]
    co = 900 * sf * traffic * np.exp(0.5 * z + rng.normal(0, 0.25))
    no2 = 40 * traffic * np.sqrt(sf) * np.exp(0.35 * z + rng.normal(0, 0.25))
    so2 = 8 * (1.8 if temp < 5 else 1.0) * np.exp(0.3 * z + rng.normal(0, 0.4))
    o3 = 55 * np.exp(0.03 * (temp - 13)) * (1 + 0.5 * np.sin(2 * np.pi * (hour - 10) / 24)) * np.exp(-0.25 * z + rng.normal(0, 0.2))
    pres = 1013 - 0.5 * (temp - 13) + rng.normal(0, 4)
    cont = np.array([so2, no2, co, o3, temp, pres, temp - spread, rain, wspm])
    cont = np.concatenate([cont, rng.normal(size=max(0, e.num_continuous - len(cont)))])[:e.num_continuous]
    pm = pm25_rule(co, so2, wspm, spread, angle, rain) * np.exp(rng.normal(0, 0.12))
    return ({"discrete": disc, "continuous": cont.astype(np.float32)},
            np.full(e.target_dims, pm, dtype=np.float32))


# ---- graph: traffic speeds -------------------------------------------------------------------------

def _network(n: int) -> dict[str, np.ndarray]:
    """The fixed sensor network of `n` sensors on two corridors (same for every seed): an inbound
    corridor congested in the morning, an outbound one in the evening; sensors along a corridor
    share its rush hours, with their own free-flow speed, dip depth and a small delay."""
    rng = np.random.default_rng(1000 + n)
    corridor = (np.arange(n) >= n // 2).astype(int)
    am = np.where(corridor == 0, 0.45, 0.15) * rng.uniform(0.7, 1.3, n)
    pm = np.where(corridor == 0, 0.15, 0.45) * rng.uniform(0.7, 1.3, n)
    phase = np.concatenate([np.linspace(0, 0.5, (corridor == 0).sum()), np.linspace(0, 0.5, (corridor == 1).sum())])
    return {"free_flow": rng.uniform(55, 70, n), "am_dip": am, "pm_dip": pm,
            "phase": phase + rng.normal(0, 0.05, n), "corridor": corridor}


def _daily_speed(net: dict[str, np.ndarray], tod: np.ndarray, dow: np.ndarray, steps_per_day: int) -> np.ndarray:
    """Speed (mph) of every sensor at every step: (n, T)."""
    hours = tod * 24 / steps_per_day - net["phase"][:, None]
    rush = np.where(dow >= 5, 0.3, 1.0)  # weekends: shallow dips
    am = np.exp(-0.5 * (hours - 8) ** 2)
    pm = np.exp(-0.5 * ((hours - 17.5) / 1.5) ** 2)
    return net["free_flow"][:, None] * (1 - rush * (net["am_dip"][:, None] * am + net["pm_dip"][:, None] * pm))


def _incident(rng: Rng, net: dict[str, np.ndarray], T: int, observed: int) -> np.ndarray:
    """Speed loss (n, T) of one incident: most start while observed, some in the forecast window."""
    n = len(net["free_flow"])
    loss = np.zeros((n, T))
    node = int(rng.integers(n))
    onset = int(rng.integers(-6, observed)) if rng.random() < 0.85 else int(rng.integers(observed, T))
    end, drop = onset + int(rng.integers(8, 30)), rng.uniform(15, 35)
    steps = np.arange(T)
    for hop, share in enumerate((1.0, 0.6, 0.3)):  # queue spills back to upstream sensors
        j = node - hop
        if j < 0 or net["corridor"][j] != net["corridor"][node]:
            break
        start = onset + 2 * hop
        active = np.clip((steps - start + 1) / 2, 0, 1) * np.clip((end - steps) / 4 + 1, 0, 1)
        loss[j] = drop * share * active
    return loss


def graph(mc: ModalityConfig, rng: Rng) -> tuple[dict[str, Any], np.ndarray]:
    """series (nodes, in_steps, features) mph; target (nodes, horizon) mph."""
    e = mc.encoder
    net = _network(e.num_nodes)
    T = e.in_steps + e.horizon
    t = int(rng.integers(0, 7 * e.steps_per_day)) + np.arange(T)  # absolute 5-minute steps in a week
    tod, dow = t % e.steps_per_day, (t // e.steps_per_day) % 7
    v = _daily_speed(net, tod, dow, e.steps_per_day) * rng.uniform(0.95, 1.05)  # weather
    if rng.random() < 0.35:
        v = v - _incident(rng, net, T, e.in_steps)
    v = np.maximum(v, 3.0) + rng.normal(0, 1.0, v.shape)
    feats = [v[:, :e.in_steps]] + [v[:, :e.in_steps] * rng.uniform(0.9, 1.1)] * (e.features - 1)
    last = e.in_steps - 1  # time of day and weekday of the last observed step
    return ({"series": np.stack(feats, -1).astype(np.float32), "time_of_day": int(tod[last]),
             "day_of_week": int(dow[last])}, v[:, e.in_steps:].astype(np.float32))

"""``mig demo --simulate`` / ``mig send --simulate``: a migration predicted before it runs.

The command line's guest, devices and migration parameters become a
``SimConfig``; ``mig.sim.simulate`` runs the real loop, policies and device
handlers on it in virtual time, with this host's model (``mig bench
calibrate``) or, until the host is calibrated, the shipped default. The result
is the ``query()`` a real run returns, plus ``"simulated": true`` and the model
it came from.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from mig.policies import DEFAULT_POLICY
from mig.sim import LinkModel, SimConfig, load_host_model, simulate

__all__ = ["UNCAPPED_LINK", "VIRTUAL_TIMEOUT", "predict", "sim_config"]

# Without --max-bandwidth, mig send's network is unknown: the prediction assumes a
# 10 Gbit/s link and says so.
UNCAPPED_LINK = 10e9 / 8
# Virtual seconds a prediction without --timeout may run: a migration that
# never converges is reported as cancelled here instead of running forever.
VIRTUAL_TIMEOUT = 600.0


def sim_config(
    params: dict[str, Any],
    *,
    size: int,
    workload: str,
    vcpus: int,
    devices: str,
    host_model: Path | None = None,
    demo: bool = True,
    seed: int = 1,
) -> tuple[SimConfig, str]:
    """The simulated twin of a command line, and the host model's origin.

    The built-in guest starts zeroed: only what its workload writes holds
    data, the rest goes out as zero pages. ``mig demo`` (``demo``) starts its
    migration once its destination process is ready, so the workload has run
    for the host model's warm-up by then; ``mig send`` starts at once."""
    host, origin = load_host_model(host_model)
    params = dict(params)
    if params.get("compression", "none") != "none":
        raise ValueError("--simulate does not model compression: leave out --compress")
    policy = params.pop("policy", DEFAULT_POLICY)
    if not params.get("timeout"):
        params["timeout"] = VIRTUAL_TIMEOUT
        params["timeout_action"] = "cancel"
    bottleneck = 0.0
    if demo:
        # mig demo's destination is on this host's loopback: the sender's
        # own pace is the limit, under --max-bandwidth too (the cap paces
        # the wire; the sender still tells every zero page from data).
        bottleneck = host.loopback_bandwidth
        host = replace(host, send_per_page=host.loopback_per_page,
                       final_per_page=host.loopback_final_per_page)  # fmt: skip
    else:
        # mig send's destination is another host: its loop shares no cores
        # with the source's RAM stream (``mig.sim_contention``).
        host = replace(host, device_load_contention=1.0)
        if not params.get("max_bandwidth"):
            bottleneck = UNCAPPED_LINK  # mig send's network is unknown
    link = LinkModel(
        bottleneck=bottleneck, stream_start=host.loopback_stream_start if demo else 0.0
    )
    config = SimConfig(
        memory=size,
        workload=workload,
        vcpus=vcpus,
        devices=() if devices == "none" else (devices,),
        policy=policy,
        params=params,
        link=link,
        host=host,
        prefilled=False,
        warmup=None if demo else 0.0,
        label="simulate",
        seed=seed,
    )
    return config, origin


def predict(config: SimConfig, origin: str) -> dict[str, Any]:
    """Run ``config`` in virtual time: ``query()`` with ``simulated`` and ``host-model``."""
    q = simulate(config)
    q["simulated"] = True
    q["host-model"] = {"source": origin, **q["config"]["host"]}
    if not config.params.get("max_bandwidth"):
        q["sim"]["assumed-link"] = config.link.bottleneck
    return q

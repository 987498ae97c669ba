"""``mig demo --simulate`` / ``mig send --simulate`` and ``mig bench calibrate``'s model file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mig.cli import EXIT_OK, EXIT_USAGE, main
from mig.sim import HostModel, load_host_model, save_host_model

SMALL = ["--size", "64MiB", "--workload", "uniform:rate=2000", "--max-bandwidth", "64MiB/s",
         "--devices", "nic:state=2MiB,rate=1MiB/s", "--downtime-limit", "300ms"]  # fmt: skip


@pytest.fixture
def model_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "host-model.json"
    monkeypatch.setenv("MIG_HOST_MODEL", str(path))
    return path


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict, str]:
    status = main(list(argv))
    out, err = capsys.readouterr()
    return status, json.loads(out) if out.strip() else {}, err


def test_demo_simulate_json_predicts_a_completed_migration(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status, q, err = run_json(capsys, "demo", "--simulate", "--json", *SMALL)
    assert status == EXIT_OK, err
    assert q["status"] == "completed" and q["simulated"] is True and q["verified"]
    # The demo's guest starts zeroed: far less than its 64 MiB goes out as
    # data, and the 16384 zero pages cost their offsets only.
    assert 0 < q["total-time"] <= 1000
    assert 0 < q["downtime"] <= 300
    assert 0 < q["ram"]["normal"] < (64 << 20) // 4096 // 2
    assert q["ram"]["transferred"] < 32 << 20 and len(q["passes"]) >= 1
    assert [d["type"] for d in q["devices"]] == ["nic"]
    assert q["devices"][0]["precopy-bytes"] > 0
    # Not calibrated: the shipped default, and the output says so.
    assert q["host-model"]["source"].startswith("default")
    assert "host model: default" in err and "mig bench calibrate" in err


def test_send_simulate_uses_the_calibrated_model(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    slow = HostModel(digest_rate=0.5e9)  # a slow digest: a visibly longer downtime
    save_host_model(slow, model_file, {"commit": "x", "date": "2026-01-01T00:00:00Z"})
    argv = ["send", "--connect", "tcp:192.0.2.1:1", "--simulate", "--json", "--verify", "strict"]
    argv += SMALL
    status, q, err = run_json(capsys, *argv)
    assert status == EXIT_OK, err
    assert q["simulated"] and q["status"] == "completed"
    assert q["host-model"]["source"].startswith(str(model_file))
    assert q["host-model"]["digest_rate"] == 0.5e9
    model_file.unlink()
    _, fast, _ = run_json(capsys, *argv)
    # With verify strict the destination digests all 64 MiB in the downtime:
    # 128 ms at 0.5 GB/s.
    slower = q["downtime-breakdown"]["dest-digest"] - fast["downtime-breakdown"]["dest-digest"]
    assert slower == pytest.approx(1000 * (64 << 20) * (1 / 0.5e9 - 1 / 8e9), rel=0.05)


def test_simulate_prints_the_same_summary(model_file: Path, capsys) -> None:
    assert main(["demo", "--simulate", *SMALL]) == EXIT_OK
    out, err = capsys.readouterr()
    assert "simulated migration summary" in out and "downtime" in out
    assert "simulated, not run" in err


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not readable JSON"),
        ('{"digest_rate": 1}', "no 'host-model' object"),
        ('{"host-model": {"digest_rate": -1}}', "digest_rate=-1"),
        ('{"host-model": {"digest_rate": 0}}', "digest_rate must be positive"),
        ('{"host-model": {"bogus": 1}}', "unknown fields bogus"),
        ('{"host-model": {"sync_base": "fast"}}', "sync_base='fast'"),
    ],
)
def test_a_bad_host_model_file_is_a_clear_usage_error(
    model_file: Path, capsys: pytest.CaptureFixture[str], content: str, message: str
) -> None:
    model_file.write_text(content)
    with pytest.raises(ValueError, match=message):
        load_host_model(model_file)
    status, q, err = run_json(capsys, "demo", "--simulate", "--json", *SMALL)
    assert status == EXIT_USAGE and q == {}
    assert str(model_file) in err and message.split("=")[0] in err
    assert "Traceback" not in err


def test_simulate_refuses_what_it_does_not_model(model_file: Path, capsys) -> None:
    assert main(["demo", "--simulate", "--compress", "zstd", *SMALL]) == EXIT_USAGE
    assert "compression" in capsys.readouterr().err


def test_a_saved_model_round_trips(tmp_path: Path) -> None:
    model = HostModel(digest_rate=3e9, sync_per_page=2.3e-9, link_jitter=0.1)
    path = tmp_path / "deep" / "m.json"
    save_host_model(model, path, {"commit": "abc", "date": "2026-11-30T00:00:00Z"})
    loaded, origin = load_host_model(path)
    assert loaded == model and "2026-11-30" in origin


def warmed(model_file: Path, capsys: pytest.CaptureFixture[str], warmup: float) -> dict:
    """``mig demo --simulate`` with a model whose warm-up is ``warmup`` seconds."""
    model = HostModel(warmup_base=warmup, warmup_per_byte=0.0)
    save_host_model(model, model_file, {"commit": "x", "date": "2026-01-01T00:00:00Z"})
    status, q, err = run_json(capsys, "demo", "--simulate", "--json", *SMALL)
    assert status == EXIT_OK, err
    return q


def test_a_zeroed_guest_sends_the_pages_it_wrote_as_data(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # uniform:rate=2000 over 16384 pages: a 2 s warm-up writes about 3500
    # distinct pages, the migration (well under a second at 64 MiB/s) fewer
    # than 2000 more. Only those hold data; a filled guest would send 16384.
    q = warmed(model_file, capsys, 2.0)
    normal = q["ram"]["normal"]
    assert 3000 <= normal <= 3500 + 2000
    assert q["ram"]["duplicate"] > 16384 - normal - 1
    # The warm-up is the model's: a longer one leaves more data to send.
    longer = warmed(model_file, capsys, 6.0)
    assert longer["ram"]["normal"] > normal + 2500
    assert longer["total-time"] > q["total-time"]


def test_send_simulate_starts_its_guest_without_a_warm_up(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mig send migrates at once: the demo's destination start-up is not its.
    model = HostModel(warmup_base=6.0, warmup_per_byte=0.0)
    save_host_model(model, model_file, {"commit": "x", "date": "2026-01-01T00:00:00Z"})
    argv = ["send", "--connect", "tcp:192.0.2.1:1", "--simulate", "--json", *SMALL]
    status, q, err = run_json(capsys, *argv)
    assert status == EXIT_OK, err
    assert q["ram"]["normal"] < 2000


def test_an_uncapped_demo_runs_at_the_models_loopback_pace(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # mig demo's destination is on the loopback: without a cap the model's
    # loopback rate and per-page sender time set the pace, not a 10 Gbit/s guess.
    uncapped = [a for a in SMALL if a not in ("--max-bandwidth", "64MiB/s")]
    times = []
    for per_page in (0.0, 20e-6):
        model = HostModel(loopback_bandwidth=200e6, loopback_per_page=per_page)
        save_host_model(model, model_file, {"commit": "x", "date": "2026-01-01T00:00:00Z"})
        status, q, err = run_json(capsys, "demo", "--simulate", "--json", *uncapped)
        assert status == EXIT_OK, err
        assert q["sim"]["assumed-link"] == 200e6
        times.append(q["total-time"])
    # 16384 pages at least once at 20 us each: over 300 ms more.
    assert times[1] - times[0] > 300


def test_each_seed_is_one_run_and_the_same_seed_the_same_run(
    model_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--seed`` picks the simulated guest's writes and the link's jitter:
    the same seed gives the same run, another seed another run; a real run
    has no seed, so the option alone is a usage error."""
    runs = {}
    for seed in ("1", "2", "1"):
        status, q, err = run_json(capsys, "demo", "--simulate", "--json", "--seed", seed, *SMALL)
        assert status == EXIT_OK, err
        runs.setdefault(seed, []).append((q["total-time"], q["ram"]["transferred"]))
    assert runs["1"][0] == runs["1"][1]
    assert runs["2"][0] != runs["1"][0]
    assert main(["demo", "--seed", "2", *SMALL]) == EXIT_USAGE
    assert "--simulate" in capsys.readouterr().err

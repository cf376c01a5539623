"""The multi-mic replay bench (bench/replay.py, bench/loadgen.py, `ringserve bench`) against a
real daemon at small N: pacing on the absolute schedule, latency and loss accounting (refused,
timed out), the capacity search, the soak's RSS figures, and --json/--csv holding every
reported figure. No assertion on absolute speed: the machine is shared and noisy."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import time
import wave
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench import replay
from bench.replay import (
    FRAMES_PER_S,
    LoadFleet,
    PointResult,
    PointSettings,
    find_capacity,
    measure_point,
)
from tests.conftest import DaemonProcess

FAST = PointSettings(window_s=1.0, warmup_s=0.5, stable_windows=2, max_point_s=2.0, load_procs=1)


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two short 16 kHz WAVs (a tone burst over noise): accounting needs audio, not speech."""
    root = tmp_path_factory.mktemp("bench-audio")
    rng = np.random.default_rng(7)
    for i, seconds in enumerate((3.1, 4.7)):
        n = int(16000 * seconds)
        t = np.arange(n) / 16000
        pcm = 400 * rng.standard_normal(n) + 6000 * np.sin(2 * np.pi * (180 + 40 * i) * t) * (np.sin(t * 3) > 0)
        with wave.open(str(root / f"mic_{i}.wav"), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(2)
            w.setframerate(16000)
            w.writeframes(np.clip(pcm, -32768, 32767).astype("<i2").tobytes())
    return root


@pytest.fixture(scope="module")
def fleet(audio_dir: Path) -> Iterator[LoadFleet]:
    with LoadFleet(audio_dir, max_procs=2) as f:
        yield f


def test_pacing_follows_the_absolute_schedule(engine: DaemonProcess, fleet: LoadFleet) -> None:
    streams = 6
    point = measure_point(engine.endpoint, streams, shape="device", duration_s=3.0, settings=FAST, fleet=fleet)
    assert point.stop_reason == "duration" and point.measured_windows == 3
    # Every window holds exactly the chunks its stretch of the absolute schedule has: 31 or 32
    # per stream per second (the phase decides). A pacer that skipped chunks after a stall, or
    # that slept a period after each send (drifting later and later), fails this ...
    for window in point.windows:
        assert abs(window["sent"] - streams * FRAMES_PER_S * FAST.window_s) <= streams, window
    assert abs(point.sent_fps - FRAMES_PER_S * streams) <= streams / FAST.window_s
    # ... and each chunk left close to its due time: the median send-time error is the wake-up
    # granularity (a frame is 32 ms), in the first window as in the last (no drift).
    assert 0 <= point.lateness_p50_ms < 8.0, point.lateness_p50_ms
    assert point.lateness_p99_ms >= point.lateness_p50_ms
    for window in point.windows:
        assert 0 <= window["lateness_p50_ms"] < 8.0, window
    assert point.sent == point.answered and point.lost == 0 and point.unexplained == 0
    assert point.streams_opened == point.streams_closed == streams
    assert 0 < point.p50_ms <= point.p90_ms <= point.p95_ms <= point.p99_ms <= point.max_ms
    assert point.engine["frames"] > 0 and point.engine["avg_batch"] >= 1.0
    assert point.cpu["frontend_pct"] >= 0 and point.cpu["workers_pct"] >= 0 and point.cpu["bench_pct"] > 0


def test_gateway_shape_and_max_pace(engine: DaemonProcess, fleet: LoadFleet) -> None:
    gateway = measure_point(engine.endpoint, 5, shape="gateway", duration_s=1.0, settings=FAST, fleet=fleet)
    assert gateway.sent == gateway.answered > 0 and gateway.lost == 0 and gateway.unexplained == 0
    assert gateway.streams_closed == 5
    # one message per tick carries every due stream: pacing error is bounded by the tick
    assert gateway.lateness_p50_ms <= FAST.tick_ms + 8.0
    closed = measure_point(engine.endpoint, 3, pace="max", duration_s=1.0, settings=FAST, fleet=fleet)
    assert closed.sent == closed.answered and closed.lost == 0 and closed.unexplained == 0
    assert math.isnan(closed.lateness_p50_ms)  # no schedule in a closed loop


def test_a_gateway_sends_one_message_per_tick(engine: DaemonProcess, fleet: LoadFleet) -> None:
    """Chunks that fall due between ticks wait for the next one, however often replies wake the
    load process: 64 streams over 8 ticks a frame is 8 frames a message (sending whatever was due
    at each wake-up, this bench sent 2.7)."""
    streams = 64
    point = measure_point(engine.endpoint, streams, shape="gateway", duration_s=1.0, settings=FAST, fleet=fleet)
    assert point.sent == point.answered > 0 and point.lost == 0
    counters = point.engine["counters"]
    ticks_per_frame = 32.0 / FAST.tick_ms
    # the engine's counters over the measured windows: the gateway's messages and the bench's STATS (one a window)
    frames_per_message = counters["frames_in"] / counters["messages_in"]
    assert frames_per_message >= 0.9 * streams / ticks_per_frame, counters
    assert point.lateness_p50_ms >= 0.25 * FAST.tick_ms  # waiting for the tick is part of the schedule error


@pytest.mark.parametrize(("shape", "link"), [("device", "zmtp"), ("device", "libzmq"), ("gateway", "zmtp"),
                                            ("gateway", "libzmq")])
def test_refused_frames_are_counted_lost_with_their_code(engine: DaemonProcess, fleet: LoadFleet, shape: str,
                                                         link: str) -> None:
    # Stream 3 is scheduled like the others but never opened: the engine answers each of its
    # frames with ERROR UNKNOWN_STREAM, which must show up as refused, not as answered or missing
    # (whether the load speaks ZMTP itself or through libzmq's DEALERs, or multiplexes its
    # streams as a gateway, whose ledger is bench/load_gateway.py's).
    settings = dataclasses.replace(FAST, link=link)
    point = measure_point(engine.endpoint, 2, shape=shape, duration_s=2.0, settings=settings, fleet=fleet,
                          unopened_streams=1)
    refused = point.refused.get("UNKNOWN_STREAM", 0)
    assert refused > 0 and set(point.refused) == {"UNKNOWN_STREAM"}
    assert point.lost == refused and point.timed_out == 0 and point.shed == 0
    assert point.sent == point.answered + refused and point.unexplained == 0
    # a third of the frames went to the unopened stream (same schedule, same rate)
    assert abs(refused - point.sent / 3) <= 3
    assert not point.passed and any("lost" in reason for reason in point.fail_reasons)


@pytest.mark.parametrize("shape", ["device", "gateway"])
def test_frames_of_a_stopped_daemon_time_out(engine: DaemonProcess, fleet: LoadFleet, shape: str) -> None:
    settings = PointSettings(window_s=1.0, warmup_s=0.5, load_procs=1, timeout_ms=300.0)
    stopped: list[int] = []

    def stop_daemon_once(window: dict[str, Any]) -> None:
        if not stopped:  # right after the first window: the streams are open and flowing
            stopped.append(window["index"])
            os.kill(engine.pid, signal.SIGSTOP)  # the front-end stops answering for 1 s > 300 ms
            try:
                time.sleep(1.0)
            finally:
                os.kill(engine.pid, signal.SIGCONT)

    point = measure_point(engine.endpoint, 3, shape=shape, duration_s=3.0, settings=settings, fleet=fleet,
                          on_window=stop_daemon_once)
    assert stopped == [0]
    assert point.timed_out > 0, point
    assert point.lost == point.timed_out + point.shed + sum(point.refused.values())
    assert point.unexplained == 0 and point.sent == point.answered + point.timed_out + sum(point.refused.values())
    # the daemon answered the timed-out frames once it ran again: late, and not answered
    assert 0 < point.late <= point.timed_out
    assert point.max_ms <= 300  # nothing counted answered after its time-out
    assert not point.passed


def test_capacity_search_doubles_then_bisects(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fake_point(endpoint: str, streams: int, **_: Any) -> PointResult:
        calls.append(streams)
        ok = streams <= 37
        return PointResult("ringserve", "device", "realtime", streams, 32.0, 32.0, 1, 1.0,
                           needed_fps=FRAMES_PER_S * streams, achieved_fps=FRAMES_PER_S * streams * (1 if ok else 0.8),
                           p99_ms=10.0 + streams / 10 if ok else 90.0, passed=ok)

    monkeypatch.setattr(replay, "measure_point", fake_point)

    class NoFleet:
        def close(self) -> None:
            pass

    cap = find_capacity("ipc:///nowhere", start_streams=8, resolution=0.05, fleet=NoFleet())  # type: ignore[arg-type]
    assert calls[:4] == [8, 16, 32, 64]
    assert cap.capacity_streams <= 37 < cap.first_fail  # type: ignore[operator]
    assert cap.first_fail - cap.capacity_streams <= max(2, 0.05 * cap.capacity_streams)  # type: ignore[operator]
    assert cap.p99_ms_at_capacity == pytest.approx(10.0 + cap.capacity_streams / 10)
    assert cap.saturation_fps == pytest.approx(0.8 * FRAMES_PER_S * 64)  # the overloaded point shows the ceiling
    calls.clear()
    top = find_capacity("ipc:///nowhere", start_streams=8, max_streams=20, fleet=NoFleet())  # type: ignore[arg-type]
    assert calls == [8, 16, 20] and top.capacity_streams == 20 and top.limited_by_max and top.first_fail is None


def test_stability_rule() -> None:
    assert replay._agree([100.0, 104.0, 96.0], 0.10, 0.0)
    assert not replay._agree([100.0, 125.0, 96.0], 0.10, 0.0)
    assert replay._agree([1.0, 2.2, 1.5], 0.10, 1.6)  # sub-budget latency jitter within the absolute tolerance
    assert not replay._agree([1.0, math.nan, 1.0], 0.10, 1.6)


def test_soak_reports_rss_per_engine_process(engine: DaemonProcess, fleet: LoadFleet) -> None:
    from bench.soak import parse_duration, soak, summarize_rss

    result = soak(engine.endpoint, 3, 3.0, settings=FAST, fleet=fleet, window_s=1.0)
    # Its latency figures are the whole run's, not only the last stable_windows' (2 here).
    assert result.point is not None and result.point.measured_windows == result.point.judged_windows == 3
    assert {"frontend", "worker-0", "worker-1"} <= set(result.processes)
    for proc in result.processes.values():
        assert 10 < proc["start_mib"] <= proc["max_mib"] and proc["end_mib"] <= proc["max_mib"]
    assert len(result.samples) >= 3 and result.point is not None and result.point.lost == 0
    json.dumps(result.to_dict(), allow_nan=False)
    assert parse_duration("30m") == 1800 and parse_duration("1h30m") == 5400 and parse_duration("90") == 90
    with pytest.raises(ValueError):
        parse_duration("30 minutes")
    steady = [{"t": t, "w": 100.0 + (0.01 if t % 2 else 0.0)} for t in range(0, 3600, 60)]
    growing = [{"t": t, "w": 100.0 + t / 360} for t in range(0, 3600, 60)]  # 10 MiB per hour
    assert not summarize_rss(steady, {"w": 1})["w"]["flagged"]
    grown = summarize_rss(growing, {"w": 1})["w"]
    assert grown["flagged"] and grown["slope_mib_per_h"] == pytest.approx(10, rel=0.01)


def test_cli_json_and_csv_hold_every_reported_figure(engine: DaemonProcess, audio_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from engine.cli import main

    out_json, out_csv = tmp_path / "bench.json", tmp_path / "bench.csv"
    code = main(["bench", "--endpoint", engine.endpoint, "--audio", str(audio_dir), "--streams", "3",
                 "--baseline", "raw,per-frame", "--raw-seconds", "0.3", "--raw-batch", "64", "--saturation", "3",
                 "--quick", "--window-s", "0.5", "--warmup-s", "0.5", "--max-point-s", "1",
                 "--json", str(out_json), "--csv", str(out_csv), "--quiet"])
    assert code == 0
    table = capsys.readouterr().out
    report = json.loads(out_json.read_text())
    for key in ("cpus", "cpu_model", "onnxruntime", "loadavg", "source"):
        assert report["machine"][key] is not None
    raw = report["baselines"]["raw"]
    assert raw["frames_per_s"] > 0 and raw["streams"] == pytest.approx(raw["frames_per_s"] / FRAMES_PER_S)
    assert [(r["when"], r["batch"]) for r in raw["runs"]] == [("before", 64), ("after", 64)]
    saturation = report["saturation"]
    assert set(saturation) == {"ringserve/device", "per-frame/device"}
    for sat in saturation.values():
        assert sat["frames_per_s"] > 0 and sat["lost"] == 0 and sat["share_of_raw"] > 0
    assert saturation["ringserve/device"]["x_per_frame"] > 0
    assert [e["phase"] for e in report["points"]] == ["saturation", "streams", "saturation", "streams"]
    points = [e["point"] for e in report["points"] if e["phase"] == "streams"]
    assert [(p["target"], p["shape"]) for p in points] == [("ringserve", "device"), ("per-frame", "device")]
    for p in points:
        for key in ("sent", "answered", "lost", "shed", "timed_out", "p50_ms", "p90_ms", "p95_ms", "p99_ms",
                    "max_ms", "within_budget", "achieved_fps", "needed_fps", "throughput_ratio",
                    "lateness_p99_ms", "stable", "passed", "measured_windows"):
            assert p[key] is not None, (p["target"], key)
        assert p["sent"] == p["answered"] and p["lost"] == 0 and p["refused"] == {}
        assert p["cpu"]["bench_pct"] > 0
        assert p["windows"] and all("p99_ms" in w for w in p["windows"])
        # the table shows these figures; the JSON must hold the same ones
        assert f"{p['p99_ms']:.1f}" in table
    for p in points[:1]:
        for key in ("avg_batch", "queue_ms_per_frame", "compute_ms_per_batch", "compute_ms_per_frame", "queue_share"):
            assert p["engine"][key] is not None and p["engine"][key] >= 0, key
        assert p["cpu"]["frontend_pct"] >= 0 and p["cpu"]["workers_pct"] >= 0
    assert points[1]["cpu"]["server_pct"] >= 0
    with out_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 4 and {r["target"] for r in rows} == {"ringserve", "per-frame"}
    assert [r["pace"] for r in rows] == ["max", "realtime", "max", "realtime"]
    assert float(rows[1]["p99_ms"]) == pytest.approx(points[0]["p99_ms"])


def test_plot_draws_budget_and_series(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.report import write_plot

    def point(target: str, shape: str, n: int, p99: float) -> dict[str, Any]:
        return {"target": target, "shape": shape, "pace": "realtime", "streams": n, "p50_ms": p99 / 3,
                "p99_ms": p99, "achieved_fps": FRAMES_PER_S * n, "passed": p99 <= 32}

    report = {"budget_ms": 32.0, "machine": {"cpus": 2, "onnxruntime": "x", "source": "t", "loadavg": [1.0]},
              "baselines": {"raw": {"frames_per_s": 10000.0}},
              "capacity": {"ringserve/device": {"capacity_streams": 64}},
              "points": [{"phase": "capacity", "point": point("ringserve", "device", n, 3 + n / 4)}
                         for n in (16, 32, 64, 128)]
              + [{"phase": "capacity", "point": point("per-frame", "device", n, 2 + n)} for n in (8, 16, 32)]}
    path = tmp_path / "plot.png"
    write_plot(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_soak_plot_draws_rss_over_time(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from bench.soak_plot import write_soak_plot

    names = ("frontend", "worker-0")
    report = {"budget_ms": 32.0, "machine": {"cpus": 2, "onnxruntime": "x", "source": "t"},
              "soak": {"streams": 80, "duration_s": 60.0, "capacity": 100, "load_share": 0.8, "flagged": False,
                       "processes": {n: {"pid": 1, "start_mib": 60.0, "end_mib": 70.0, "slope_mib_per_h": 0.1}
                                     for n in names},
                       "samples": [{"t": float(t), **{n: 60.0 + t / 6 for n in names}} for t in range(0, 61, 10)],
                       "point": {"shape": "device", "sent": 10, "lost": 0,
                                 "windows": [{"p50_ms": 2.0, "p99_ms": 5.0 + i} for i in range(6)]}}}
    path = tmp_path / "soak.png"
    write_soak_plot(report, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000


def test_quiet_gate_waits_and_measures_a_noisy_failure_again(monkeypatch: pytest.MonkeyPatch) -> None:
    readings = iter([90.0, 80.0, 10.0, 12.0, 5.0])  # machine noise, % of a core, one per sample
    monkeypatch.setattr(replay, "machine_noise_pct", lambda _s: next(readings))
    made: list[PointResult] = []

    def measure() -> PointResult:
        noisy = not made
        point = PointResult("ringserve", "device", "realtime", 10, 32.0, 32.0, 1, 1.0, passed=not noisy,
                            cpu={"others_pct": 70.0 if noisy else 5.0, "steal_pct": 10.0 if noisy else 0.0})
        made.append(point)
        return point

    said: list[str] = []
    gate = replay.QuietGate(max_others_pct=30.0, wait_s=60.0, sample_s=0.0, retries=2)
    results = replay.measure_gated(gate, measure, said.append)
    assert [p.passed for p in results] == [False, True]
    assert results[0].superseded and not results[1].superseded
    assert results[0].noise_before_pct == 10.0 and results[1].noise_before_pct == 12.0
    assert any("waiting for a quieter machine" in s for s in said) and any("measuring again" in s for s in said)
    # a failure while the machine was quiet is a result, not noise: no second measurement
    made.clear()
    monkeypatch.setattr(replay, "machine_noise_pct", lambda _s: 1.0)
    quiet_fail = replay.measure_gated(gate, lambda: PointResult("ringserve", "device", "realtime", 10, 32.0, 32.0, 1,
                                                                 1.0, passed=False, cpu={"others_pct": 3.0}))
    assert len(quiet_fail) == 1 and not quiet_fail[0].superseded


@pytest.mark.parametrize("link_name", ["zmtp", "libzmq"])
def test_the_compiled_gateway_tick_carries_each_streams_next_audio(audio_dir: Path, tmp_path: Path,
                                                                    link_name: str) -> None:
    # bench/load_kernels.py builds a tick's message; its items must be what the device path
    # sends (bench/load_audio.py): each stream's id, chunk seq and next chunk of its file, the
    # file looping, for several ticks (a 3.1 s file loops within 100 ticks of 32 ms), and no
    # message holding more chunks than there are streams; a libzmq ROUTER receives the same
    # messages from the plain ZMTP socket as from a DEALER.
    import zmq

    from bench.load_audio import StreamAudio, load_audio
    from bench.load_gateway import GatewayLedger, GatewayLink
    from bench.load_plan import LoadPlan
    from bench.load_zmtp import ZmtpGatewayLink
    from transport import protocol as P

    files, n, period = load_audio(audio_dir), 5, 32_000_000
    plan = LoadPlan("ringserve", f"ipc://{tmp_path}/gw.sock", "gateway", "realtime", first_stream=10, streams=n)
    expected = StreamAudio(files, 10, n, 1, np.random.default_rng(3))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(plan.endpoint)
    kind = ZmtpGatewayLink if link_name == "zmtp" else GatewayLink
    link = kind(plan, ctx, [11 + s for s in range(n)], n, StreamAudio(files, 10, n, 1, np.random.default_rng(3)),
                GatewayLedger(1, plan.timeout_ms, n, 11, period), lambda sid: None)
    try:
        link._connect()
        order = [3, 0, 4, 1, 2]
        link.schedule(order, [1000 * i for i in range(n)], period)
        for tick in range(104):
            if tick < 100:
                assert link.send_due(tick * period + 10_000) == (tick + 1) * period
            elif tick == 100:  # a stalled sender owes four chunks a stream: four messages
                assert link.send_due(103 * period + 10_000) == 104 * period
            assert router.poll(5000)
            _, msg = router.recv_multipart()
            assert msg[:P.HEADER.size] == P.header(P.MsgType.AUDIO)
            at = P.HEADER.size
            for s in order:
                sid, seq, dtype, nbytes = P.AUDIO_ITEM.unpack_from(msg, at)
                at += P.AUDIO_ITEM.size
                assert (sid, seq, dtype) == (11 + s, tick + 1, P.DType.INT16)
                assert msg[at:at + nbytes] == expected.next_pcm(s)
                at += nbytes
            assert at == len(msg)
        assert not router.poll(100)
        assert link.ledger.in_flight() == 104 * n
    finally:
        link.shutdown()
        router.close(0)
        ctx.term()


def test_the_compiled_device_load_sends_each_streams_audio_and_takes_the_replies(audio_dir: Path,
                                                                                  tmp_path: Path) -> None:
    # bench/load_device_kernels.py sends each stream's frames on its own connection and reads
    # the replies with libc's send and recv: a libzmq ROUTER must get each stream's next chunk of
    # its file (looping) under its id and seq; RESULTS replies are matched to the chunks in
    # flight (answered, with a latency each), one for a chunk not in flight is unexpected, an
    # ERROR (the Python path) refuses its chunk, and a closed connection is counted.
    import zmq

    from bench.load_audio import StreamAudio, load_audio
    from bench.load_device import ZmtpDeviceLink
    from bench.load_gateway import GatewayLedger
    from bench.load_plan import LoadPlan
    from bench.load_socket import Connection
    from transport import protocol as P

    files, n, period, ticks = load_audio(audio_dir), 4, 32_000_000, 100
    plan = LoadPlan("ringserve", f"ipc://{tmp_path}/dev.sock", "device", "realtime", first_stream=20, streams=n)
    expected = StreamAudio(files, 20, n, 1, np.random.default_rng(5))
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(plan.endpoint)
    ledger = GatewayLedger(1, plan.timeout_ms, n, 21, period)
    link = ZmtpDeviceLink(plan, ctx, [21 + s for s in range(n)], n,
                          StreamAudio(files, 20, n, 1, np.random.default_rng(5)), ledger, lambda sid: None)

    def result(sid: int, seq: int) -> bytes:
        return P.header(P.MsgType.RESULTS) + P.RESULT_ITEM.pack(sid, seq, seq - 1, 1, 0, 0) + bytes(4)

    python_parsed: list[bytes] = []  # replies the compiled reads handed to the Python parser
    parse = link._on_data

    def parse_in_python(conn: Connection, data: bytes) -> None:
        python_parsed.append(data)
        parse(conn, data)

    link._on_data = parse_in_python  # type: ignore[method-assign]

    try:
        link._connect()
        link.schedule([2, 0, 3, 1], [1000 * i for i in range(n)], period)
        identities: dict[int, bytes] = {}
        for tick in range(ticks):
            assert link.send_due(tick * period + 10_000) == (tick + 1) * period
            got = {}
            for _ in range(n):
                assert router.poll(5000)
                identity, msg = router.recv_multipart()
                assert msg[:P.HEADER.size] == P.header(P.MsgType.AUDIO, tick + 1)
                sid, seq, dtype, nbytes = P.AUDIO_ITEM.unpack_from(msg, P.HEADER.size)
                assert (seq, dtype, len(msg)) == (tick + 1, P.DType.INT16, P.HEADER.size + P.AUDIO_ITEM.size + nbytes)
                assert identities.setdefault(sid, identity) == identity  # each stream on its own connection
                got[sid - 21] = msg[P.HEADER.size + P.AUDIO_ITEM.size:]
            assert sorted(got) == list(range(n))
            for s in range(n):
                assert got[s] == expected.next_pcm(s), (tick, s)
            for sid, identity in identities.items():
                if tick < ticks - 1 or sid != 21:
                    router.send_multipart([identity, result(sid, tick + 1)])
            link.poll(0.2)
        assert len(set(identities.values())) == n
        router.send_multipart([identities[22], result(22, 5)])  # answered already
        router.send_multipart([identities[21], P.encode_error(ticks, 21, ticks, P.ErrorCode.OVERLOADED, "busy")])
        deadline = time.monotonic() + 5
        while ledger.in_flight() or ledger.window.unexpected < 1:
            assert time.monotonic() < deadline, (ledger.in_flight(), ledger.window.export(0))
            link.poll(0.05)
        window = ledger.window
        assert (window.sent, window.answered, window.unexpected) == (ticks * n, ticks * n - 1, 1)
        assert window.refused == {"OVERLOADED": 1} and len(window.lat) == ticks * n - 1
        # Python parsed each connection's first read (the ROUTER's READY command leads it) and
        # the ERROR; the compiled reads took every other reply.
        assert [data[0] & 0x04 for data in python_parsed[:n]] == [0x04] * n
        assert len(python_parsed) == n + 1 and python_parsed[n][2 + 3] == P.MsgType.ERROR
        router.close(0)
        while window.other_errors["disconnected"] < n:
            assert time.monotonic() < deadline, window.other_errors
            link.poll(0.05)
        assert window.other_errors == {"disconnected": n}
    finally:
        link.shutdown()
        router.close(0)
        ctx.term()


def test_a_gateway_connection_holds_as_many_streams_as_the_engine_allows(audio_dir: Path, tmp_path: Path) -> None:
    """The bench reads the engine's limits from STATS and gives each gateway connection (one
    load process) as many streams as max_streams_per_connection allows, no more: 10 streams on
    an engine that allows 4 per connection are three gateways, every stream opened, nothing lost."""
    from engine.cli import main
    from tests.conftest import spawn_daemon

    assert replay.auto_load_procs(1280, "gateway", 4096) == 1
    assert replay.auto_load_procs(640, "device", cpus=2) == 1
    assert replay.auto_load_procs(1600, "device", cpus=4) == 3
    assert replay.auto_load_procs(1280, "gateway", 1024) == 2
    daemon = spawn_daemon("--workers", "1", "--max-streams-per-connection", "4")
    try:
        out_json = tmp_path / "bench.json"
        code = main(["bench", "--endpoint", daemon.endpoint, "--audio", str(audio_dir), "--shape", "gateway",
                     "--streams", "10", "--quick", "--window-s", "0.5", "--warmup-s", "0.5", "--max-point-s", "1",
                     "--json", str(out_json), "--quiet"])
    finally:
        assert daemon.stop() == 0, daemon.log()
    assert code == 0
    report = json.loads(out_json.read_text())
    assert report["target"]["limits"]["max_streams_per_connection"] == 4
    assert report["settings"]["streams_per_connection"] == 4
    point = report["points"][-1]["point"]
    assert point["load_procs"] == 3 and point["streams_opened"] == 10 and point["open_failures"] == {}
    assert point["sent"] == point["answered"] > 0 and point["lost"] == 0


def test_repeat_interleaves_searches_and_reports_their_median(engine: DaemonProcess, audio_dir: Path,
                                                              tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--repeat 2: round 1 searches ringserve then the per-frame server, the raw baseline runs,
    then round 2 does the same; each target's capacity is the lower of its two searches, every
    search is in the JSON, each round's points are tagged in the JSON and CSV, and the summary
    says the capacity is a median."""
    from engine.cli import main

    out_json, out_csv = tmp_path / "bench.json", tmp_path / "bench.csv"
    code = main(["bench", "--endpoint", engine.endpoint, "--audio", str(audio_dir), "--find-capacity",
                 "--repeat", "2", "--start-streams", "2", "--max-streams", "4", "--no-profile",
                 "--baseline", "raw,per-frame", "--raw-seconds", "0.3", "--raw-batch", "64",
                 "--quick", "--window-s", "0.5", "--warmup-s", "0.5", "--max-point-s", "1",
                 "--json", str(out_json), "--csv", str(out_csv), "--quiet"])
    table = capsys.readouterr().out
    assert code == 0, table
    report = json.loads(out_json.read_text())
    assert report["repeat"] == 2
    assert [r["when"] for r in report["baselines"]["raw"]["runs"]] == ["before", "after round 1", "after"]
    order = [(e["round"], e["point"]["target"]) for e in report["points"] if e["phase"] == "capacity"]
    assert order == sorted(order, key=lambda o: (o[0], o[1] != "ringserve"))  # rounds interleave the targets
    assert {o for o in order} == {(1, "ringserve"), (1, "per-frame"), (2, "ringserve"), (2, "per-frame")}
    for key in ("ringserve/device", "per-frame/device"):
        searches = report["searches"][key]
        assert [s["round"] for s in searches] == [1, 2]
        cap = report["capacity"][key]
        assert cap["searches"] == [s["capacity_streams"] for s in searches]
        assert cap["capacity_streams"] == min(cap["searches"]) > 0
        assert cap["median_round"] in (1, 2) and cap["capacity_point"]["streams"] == cap["capacity_streams"]
    ratios = report["ratios"]["ringserve/device"]
    assert set(ratios["x_per_frame_by_round"]) == {"1", "2"} and set(ratios["share_of_raw_by_round"]) == {"1", "2"}
    goal = report["targets"]["ringserve/device"]["x_per_frame"]
    assert goal["rounds"] == 2 and 0 <= goal["met_in_rounds"] <= 2
    assert "median of 2 searches" in table and "capacity r2" in table
    with out_csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["round"] for r in rows if r["phase"] == "capacity"} == {"1", "2"}
    assert main(["bench", "--endpoint", engine.endpoint, "--streams", "3", "--repeat", "2"]) == 2
    assert "--repeat repeats capacity searches" in capsys.readouterr().err


def test_the_median_search_is_the_lower_middle_one() -> None:
    from bench.cli_measure import settle_capacities

    report: dict[str, Any] = {"capacity": {}, "searches": {
        "ringserve/device": [{"round": r, "capacity_streams": c} for r, c in ((1, 320), (2, 480), (3, 336))],
        "ringserve/gateway": [{"round": r, "capacity_streams": c} for r, c in ((1, 704), (2, 560))]}}
    settle_capacities(report)
    assert report["capacity"]["ringserve/device"]["capacity_streams"] == 336
    assert report["capacity"]["ringserve/device"]["median_round"] == 3
    assert report["capacity"]["ringserve/device"]["searches"] == [320, 480, 336]
    assert report["capacity"]["ringserve/gateway"]["capacity_streams"] == 560


def test_the_summary_never_rounds_a_figure_onto_its_target(capsys: pytest.CaptureFixture[str]) -> None:
    """A figure just under its target keeps the digits that show it: 398 streams of a 1,000-stream
    ceiling is 39.8 % against 40 %, and 398 against the per-frame server's 80 is 4.97x against 5x,
    not "40 %" and "5.0x" beside MISSED."""
    from bench.cli_summary import derive, print_summary

    report: dict[str, Any] = {
        "machine": {"source": "test", "cpus": 2, "cpu_model": "test", "onnxruntime": "test", "loadavg": [0.0]},
        "loadavg_end": [0.0], "elapsed_s": 1.0,
        "budget_ms": 32.0, "repeat": 1, "points": [], "saturation": {}, "profile": {}, "ratios": {}, "targets": {},
        "baselines": {"raw": {"streams": 1000.0, "frames_per_s": 31250.0, "workers": 2, "runs": []}},
        "capacity": {"ringserve/device": {"capacity_streams": 398, "saturation_fps": 15000.0},
                     "ringserve/gateway": {"capacity_streams": 760, "saturation_fps": 30000.0},
                     "per-frame/device": {"capacity_streams": 80, "saturation_fps": 3000.0}}}
    derive(report, {"raw", "per-frame"})
    print_summary(report)
    out = capsys.readouterr().out
    assert "ringserve/device >= 40 % of raw: got 39.8 % -> MISSED" in out
    assert "ringserve/device >= 5x per-frame: got 4.97x -> MISSED" in out
    assert "39.8 % of raw, 4.97x per-frame" in out
    assert "ringserve/gateway >= 75 % of raw: got 76 % -> met" in out
    assert "ringserve/gateway >= 5x per-frame: got 9.5x -> met" in out
    assert "per-frame/device" in out and "8 % of raw" in out  # no target: plain rounding

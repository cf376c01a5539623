"""A real PortAudio/ALSA input device that "hears" a WAV file, for tests without a sound card.

How it works
============

ALSA's ``file`` PCM plugin wraps a slave PCM; with ``infile`` set, every
capture read from the slave is overwritten with the next bytes of that file
(``format "raw"``: the bytes must be in the slave's sample format, channel
count and rate).  So the data comes from the file and the *timing* comes from
the slave.  Two slaves are offered:

``paced=True`` (default): slave ``type jack`` (ALSA plugin from
    ``libasound2-plugins``) connected to the capture ports of a private
    ``jackd`` server started here with the ``dummy`` backend (``jackd2``).
    The dummy backend runs on the system clock, so the device delivers audio
    in real time like a microphone (2 s of capture takes 2 s), at a fixed
    rate and channel count: PortAudio reports exactly ``samplerate`` as the
    device's default rate and ``channels`` input channels, and opens it in
    float32 without any ALSA-side conversion.  Captured samples are
    bit-identical to the raw file.

``paced=False``: slave ``type null`` behind ``type plug`` (ALSA built-ins,
    no daemon).  Data is still exact, but ``null`` has no clock: capture runs
    as fast as the CPU allows (~1000x real time) and after the end of the file
    it returns stale buffer contents.  Good for a one-shot ``sd.rec`` check,
    not for a streaming microphone.

The PCM is defined in a config file written to ``tmp_dir``, and ALSA is
pointed at it with ``ALSA_CONFIG_PATH=<system alsa.conf>:<our file>`` (alsa-lib
splits that variable on ``:``; the system file is kept so every standard
definition still exists).  Nothing system-wide is touched.

Why a subprocess: PortAudio reads the ALSA configuration and enumerates the
devices once, in ``Pa_Initialize``, which ``import sounddevice`` calls.  The
environment must therefore be in place before sounddevice is imported, and the
JACK variables (server name, no auto-start) must not leak into the test
runner, where other tests may already have imported sounddevice with the real
configuration.  ``AlsaTestDevice.run_python`` runs code with the device's
environment in a fresh interpreter; that also keeps a PortAudio crash from
taking pytest down.

apt packages (Debian 12):
    libportaudio2       PortAudio itself; the sounddevice wheel does not bundle it on Linux
    libasound2          alsa-lib (already a dependency of libportaudio2)
    libasound2-plugins  the ``jack`` ALSA PCM plugin            (paced mode)
    jackd2              the ``jackd`` server, dummy backend   (paced mode)
install with ``apt-get install -y --no-install-recommends libportaudio2
libasound2-plugins jackd2`` (``DEBIAN_FRONTEND=noninteractive`` answers the
jackd2 realtime-priority question with "no").
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import itertools
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Self

import numpy as np
import numpy.typing as npt
import soxr

try:
    from speech_audio import read_wav
except ImportError:  # tests/ imported as a package
    from tests.speech_audio import read_wav

REPO_ROOT = Path(__file__).resolve().parents[1]
SYSTEM_ALSA_CONF = Path("/usr/share/alsa/alsa.conf")
DEVICE_NAME = "ringserve_mic"
APT_INSTALL = "apt-get install -y --no-install-recommends libportaudio2 libasound2-plugins jackd2"

_counter = itertools.count()


def _alsa_plugin(name: str) -> bool:
    patterns = [
        f"/usr/lib/*/alsa-lib/libasound_module_pcm_{name}.so",
        f"/usr/lib/alsa-lib/libasound_module_pcm_{name}.so",
        f"/usr/lib64/alsa-lib/libasound_module_pcm_{name}.so",
    ]
    return any(glob.glob(p) for p in patterns)


def missing_packages(paced: bool = True) -> list[str]:
    """apt packages needed by the device that are not installed."""
    missing = []
    if ctypes.util.find_library("asound") is None:
        missing.append("libasound2")
    if ctypes.util.find_library("portaudio") is None:
        missing.append("libportaudio2")
    if paced:
        if not _alsa_plugin("jack"):
            missing.append("libasound2-plugins")
        if shutil.which("jackd") is None or ctypes.util.find_library("jack") is None:
            missing.append("jackd2")
    return missing


def _system_alsa_conf() -> str:
    if SYSTEM_ALSA_CONF.is_file():
        return str(SYSTEM_ALSA_CONF)
    for p in ("/usr/local/share/alsa/alsa.conf", "/etc/alsa/alsa.conf"):
        if Path(p).is_file():
            return p
    raise FileNotFoundError("alsa.conf not found: is libasound2 installed?")


def _jack_config(name: str, raw: Path, channels: int) -> str:
    ports = " ".join(f'{i} "system:capture_{i + 1}"' for i in range(channels))
    out_port = '0 "system:playback_1"'
    return f"""\
# written by tests/alsa_device.py: a capture device playing {raw.name} in real time
pcm.{name} {{
    type file
    slave.pcm {{
        type jack
        capture_ports {{ {ports} }}
    }}
    file "/dev/null"
    infile "{raw}"
    format "raw"
    hint {{
        show on
        description "ringserve test microphone ({raw.name})"
    }}
}}
# playback only: PortAudio lists it with 0 input channels
pcm.{name}_speaker {{
    type jack
    playback_ports {{ {out_port} }}
    hint {{
        show on
        description "ringserve test speaker (no inputs)"
    }}
}}
"""


def _null_config(name: str, raw: Path, samplerate: int, channels: int) -> str:
    return f"""\
# written by tests/alsa_device.py: an unpaced capture device reading {raw.name}
pcm.{name} {{
    type plug
    slave {{
        pcm {{
            type file
            slave.pcm {{ type null }}
            file "/dev/null"
            infile "{raw}"
            format "raw"
        }}
        format FLOAT_LE
        rate {samplerate}
        channels {channels}
    }}
    hint {{
        show on
        description "ringserve test capture, unpaced ({raw.name})"
    }}
}}
"""


_JACK_QUIET = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(lambda msg: None)


def _jack_server_up(server: str, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until ``server`` accepts clients (libjack through ctypes, no CLI tools)."""
    lib = ctypes.CDLL(ctypes.util.find_library("jack") or "libjack.so.0")
    # jack_client_open is variadic: (name, options, *status, server_name); no argtypes
    lib.jack_client_open.restype = ctypes.c_void_p
    lib.jack_client_close.argtypes = [ctypes.c_void_p]
    # silence "Cannot connect to server socket" while polling; the callback
    # object must outlive every libjack call, hence the module-level reference
    lib.jack_set_error_function(_JACK_QUIET)
    lib.jack_set_info_function(_JACK_QUIET)
    jack_no_start_server, jack_server_name = 0x01, 0x04
    deadline = time.monotonic() + timeout
    while True:
        status = ctypes.c_int(0)
        client = lib.jack_client_open(
            b"ringserve_probe",
            ctypes.c_int(jack_no_start_server | jack_server_name),
            ctypes.byref(status),
            ctypes.c_char_p(server.encode()),
        )
        if client:
            lib.jack_client_close(ctypes.c_void_p(client))
            return
        if proc.poll() is not None:
            raise RuntimeError(f"jackd exited with status {proc.returncode}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"jackd server {server!r} not up after {timeout} s")
        time.sleep(0.05)


@dataclass
class AlsaTestDevice:
    """A configured test capture device; use ``env`` in a fresh process."""

    name: str
    env: dict[str, str]
    config_path: Path
    raw_path: Path
    samplerate: int
    channels: int
    paced: bool
    reference: npt.NDArray[np.float32]  # (n, channels): exactly what the device delivers
    jack_server: str | None = None
    _jackd: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    _jackd_log: IO[bytes] | None = field(default=None, repr=False)

    def run_python(
        self, code: str, *args: str, timeout: float = 60.0
    ) -> subprocess.CompletedProcess[str]:
        """Run ``python -c code args...`` in the device's environment (cwd: repo root)."""
        return subprocess.run(
            [sys.executable, "-c", code, *args],
            env=self.env,
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def jackd_log(self) -> str:
        if self.jack_server is None:
            return ""
        path = self.config_path.parent / f"jackd-{self.jack_server}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        proc, self._jackd = self._jackd, None
        if proc is not None and proc.poll() is None:  # poll() reaps an exited jackd
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        if self._jackd_log is not None:
            self._jackd_log.close()
            self._jackd_log = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def alsa_test_device(
    wav_path: Path,
    tmp_dir: Path,
    *,
    samplerate: int = 48000,
    channels: int = 2,
    paced: bool = True,
    right_gain: float = 0.5,
    name: str = DEVICE_NAME,
    period: int = 512,
) -> AlsaTestDevice:
    """Build a capture device that plays ``wav_path`` (16-bit, any rate; downmixed).

    The WAV is converted (soxr HQ) to ``samplerate`` and written as interleaved
    float32 raw data; channel 0 is the speech, channel 1 (if any) the speech
    times ``right_gain``, so a mean downmix yields ``(1 + right_gain) / 2`` of it.
    With ``paced=True`` a private jackd is started: close the device (or use it
    as a context manager) to stop it.
    """
    if not 1 <= channels <= 8:
        raise ValueError(f"channels must be 1..8, got {channels}")
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    x, rate = read_wav(Path(wav_path))
    mono = x.mean(axis=1, dtype=np.float32)
    if rate != samplerate:
        mono = soxr.resample(mono, rate, samplerate, quality="HQ").astype(np.float32)
    gains = np.array([1.0] + [right_gain] * (channels - 1), dtype=np.float32)
    reference = np.ascontiguousarray(mono[:, None] * gains[None, :], dtype="<f4")
    raw_path = tmp_dir / f"{name}.f32"
    reference.tofile(raw_path)

    config_path = tmp_dir / f"{name}.asoundrc"
    if paced:
        config_path.write_text(_jack_config(name, raw_path, channels))
    else:
        config_path.write_text(_null_config(name, raw_path, samplerate, channels))

    env = dict(os.environ)
    env["ALSA_CONFIG_PATH"] = f"{_system_alsa_conf()}:{config_path}"
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p
    )
    device = AlsaTestDevice(
        name=name,
        env=env,
        config_path=config_path,
        raw_path=raw_path,
        samplerate=samplerate,
        channels=channels,
        paced=paced,
        reference=reference,
    )
    if not paced:
        return device

    server = f"ringserve-{os.getpid()}-{next(_counter)}"
    env["JACK_DEFAULT_SERVER"] = server  # the ALSA jack plugin (and PortAudio's JACK API)
    env["JACK_NO_START_SERVER"] = "1"
    env["JACK_NO_AUDIO_RESERVATION"] = "1"
    jack_env: dict[str, Any] = dict(env)
    log = open(tmp_dir / f"jackd-{server}.log", "wb")  # noqa: SIM115 (lives as long as jackd)
    cmd = [
        shutil.which("jackd") or "jackd",
        "--no-realtime",
        "--name", server,
        "-d", "dummy",
        "-r", str(samplerate),
        "-p", str(period),
        "-C", str(channels),
        "-P", str(channels),
    ]  # fmt: skip
    try:
        proc = subprocess.Popen(cmd, env=jack_env, stdout=log, stderr=subprocess.STDOUT)
    except BaseException:
        log.close()
        raise
    device.jack_server = server
    device._jackd = proc
    device._jackd_log = log
    try:
        _jack_server_up(server, 10.0, proc)
    except BaseException:
        device.close()
        raise
    return device

"""The speech-event machine's steps as compiled functions (numba) over a state row.

engine/vad_events.py explains the machine (silero-vad's offline segmentation replayed one
frame at a time); this is its one implementation. The state is a row of int64 words and the
limits a row of float64s, so that the front-end's compiled answer loop (engine/lane_kernels.py)
moves a stream's machine where it stands, in the stream table's matrix, with no Python per
frame; ``SpeechSegmenter`` wraps a row for everything else. Each expression is upstream's
(ints where it has ints, floats where it has floats), so every comparison rounds alike.

Events are written to ``events`` as rows (kind, sample, frame); a call returns how many.
"""

from __future__ import annotations

import math

import numpy as np

from engine.compiled import compiled

# State words (int64).
FRAME, START, TEMP_END, BEST_END, BEST_DUR, LAST_START, LAST_END, PENDING, TRIGGERED, STARTED = range(10)
N_STATE = 10
# Limits, in samples (float64), fixed for a stream's life.
THR, NEG, MIN_SPEECH, PAD, MAX_SPEECH, MIN_SILENCE, MIN_SIL_MAX, WIDTH = range(8)
N_LIMITS = 8
# Most events one push() can give: a pending cut's END (and START), a max_speech cut's, a pause's.
MAX_EVENTS = 6
START_EVENT, END_EVENT = 1, 2
FOREVER = 1 << 62


@compiled
def reset(st: np.ndarray) -> None:
    st[:] = 0
    st[PENDING] = -1  # sample of a pause-less max_speech cut whose END waits a frame


@compiled
def _emit(events: np.ndarray, n: int, kind: int, sample: int, frame: int) -> int:
    events[n, 0] = kind
    events[n, 1] = sample
    events[n, 2] = frame
    return n + 1


@compiled
def _emit_start(st: np.ndarray, lim: np.ndarray, i: int, events: np.ndarray, n: int) -> int:
    st[STARTED] = 1
    st[LAST_START] = max(int(max(0.0, st[START] - lim[PAD])), st[LAST_END])
    return _emit(events, n, START_EVENT, st[LAST_START], i)


@compiled
def _start_if_certain(st: np.ndarray, lim: np.ndarray, i: int, cur: int, events: np.ndarray, n: int) -> int:
    # Earliest possible end: the pause under way, else the next frame's pause or finish(n > cur).
    # Past min_speech from there, the segment stays.
    earliest = st[TEMP_END] if st[TEMP_END] else cur + 1
    if earliest - st[START] > lim[MIN_SPEECH]:
        return _emit_start(st, lim, i, events, n)
    return n


@compiled
def _close(st: np.ndarray, lim: np.ndarray, i: int, end: int, events: np.ndarray, n: int) -> int:
    if not st[STARTED]:
        n = _emit_start(st, lim, i, events, n)
    st[STARTED] = 0
    st[LAST_END] = max(end, st[LAST_START])
    return _emit(events, n, END_EVENT, st[LAST_END], i)


@compiled
def _cut(st: np.ndarray, lim: np.ndarray, i: int, cur: int, events: np.ndarray, n: int) -> int:
    # max_speech exceeded: offline keeps this segment whatever its length.
    st[TEMP_END] = 0
    if not st[BEST_DUR]:  # no pause to cut at: cut here, END waits a frame
        st[PENDING], st[TRIGGERED] = cur, 0
        return n if st[STARTED] else _emit_start(st, lim, i, events, n)
    end, dur = st[BEST_END], st[BEST_DUR]
    st[BEST_DUR] = 0
    # Upstream restarts iff `next_start < prev_end + cur_sample`, i.e. dur < cur: always in
    # practice, but replicated rather than assumed.
    restarts = dur < cur
    if restarts and dur < 2 * lim[PAD]:
        n = _close(st, lim, i, end + dur // 2, events, n)
    else:
        n = _close(st, lim, i, int(end + lim[PAD]), events, n)
    st[TRIGGERED], st[START] = restarts, end + dur
    return n


@compiled
def _end_cut(st: np.ndarray, lim: np.ndarray, i: int, speech: bool, events: np.ndarray, n: int) -> int:
    # Offline halves the gap to the next segment if it is under 2*pad: a one-frame gap if
    # speech restarts now, else at least two frames.
    cut = st[PENDING]
    st[PENDING] = -1
    w = int(lim[WIDTH])
    if speech and w < 2 * lim[PAD]:
        return _close(st, lim, i, cut + w // 2, events, n)
    return _close(st, lim, i, int(cut + min(lim[PAD], w)), events, n)


@compiled
def push(st: np.ndarray, lim: np.ndarray, probability: float, events: np.ndarray) -> int:
    """Frame st[FRAME]'s probability (NaN: a frame that was not run, never speech)."""
    i = st[FRAME]
    st[FRAME] = i + 1
    cur = i * int(lim[WIDTH])
    speech = probability >= lim[THR]
    n = 0
    if st[PENDING] >= 0:
        n = _end_cut(st, lim, i, speech, events, n)
    if speech and st[TEMP_END]:
        sil = cur - st[TEMP_END]
        # Upstream keeps every pause and takes max() at the cut (first one wins ties);
        # keeping only the longest gives the same answer in O(1).
        if sil > lim[MIN_SIL_MAX] and sil > st[BEST_DUR]:
            st[BEST_END], st[BEST_DUR] = st[TEMP_END], sil
        st[TEMP_END] = 0
    if not st[TRIGGERED]:
        if not speech:
            return n
        st[TRIGGERED], st[START] = 1, cur
        return _start_if_certain(st, lim, i, cur, events, n)
    if cur - st[START] > lim[MAX_SPEECH]:
        n = _cut(st, lim, i, cur, events, n)
        if not st[TRIGGERED]:
            return n
    if probability < lim[NEG]:
        if not st[TEMP_END]:
            st[TEMP_END] = cur
        if cur - st[TEMP_END] >= lim[MIN_SILENCE]:
            end = st[TEMP_END]
            if st[STARTED] or end - st[START] > lim[MIN_SPEECH]:
                n = _close(st, lim, i, int(end + lim[PAD]), events, n)
            st[TRIGGERED] = 0
            st[TEMP_END] = st[BEST_DUR] = 0
            return n
    return n if st[STARTED] else _start_if_certain(st, lim, i, cur, events, n)


@compiled
def finish(st: np.ndarray, lim: np.ndarray, audio_length_samples: int, events: np.ndarray) -> int:
    """Close an open segment at the end of the audio, as offline does; then reset."""
    length, i = audio_length_samples, st[FRAME] - 1
    n = 0
    if st[PENDING] >= 0:  # nothing follows the cut: plain pad, clamped like offline
        n = _close(st, lim, i, int(min(length, st[PENDING] + lim[PAD])), events, 0)
    elif st[TRIGGERED] and (st[STARTED] or length - st[START] > lim[MIN_SPEECH]):
        n = _close(st, lim, i, length, events, 0)  # offline ends it at n; min(n, n + pad) == n
    reset(st)
    return n


@compiled
def quiet(st: np.ndarray, lim: np.ndarray) -> tuple[float, float, int]:
    """Which next frames would change nothing but the frame count: a probability in
    [lo, hi) and a frame index below ``until`` (SpeechSegmenter.quiet)."""
    if st[PENDING] >= 0 or (st[TRIGGERED] and (not st[STARTED] or st[TEMP_END])):
        return math.inf, math.inf, 0
    if not st[TRIGGERED]:  # silence: nothing happens below the threshold
        return -math.inf, lim[THR], FOREVER
    # Speech under way with no pause: nothing happens at or above neg_threshold until the
    # frame whose sample passes max_speech (push's `cur - start > max_speech`).
    if math.isinf(lim[MAX_SPEECH]):
        return lim[NEG], math.inf, FOREVER
    w, start, longest = int(lim[WIDTH]), st[START], lim[MAX_SPEECH]
    until = max(0, int(math.floor((start + longest) / w)))  # a guess, made exact below
    while not until * w - start > longest:
        until += 1
    while until > 0 and (until - 1) * w - start > longest:
        until -= 1
    return lim[NEG], math.inf, until

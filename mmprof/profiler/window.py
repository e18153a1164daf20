"""One energy window: the readings taken at its edges and the Measurement built from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from .energy import count_updates, counter_update_time, integrate_power_j, sum_by_index
from .gpu import GpuSource, Unavailable
from .host import HostSource
from .measurement import GIB, Measurement
from .row_energy import MIN_WINDOW_S, above_idle_j, confidence_reasons
from .sampler import Sampler


ALIGN_MAX_GAP_S = 0.025   # counter reads this close place an update to within ~1/8 of NVML's 100 ms period
COUNTER_HORIZON_S = 0.3   # look this far before an edge for the counter's previous value


@dataclass
class Edge:
    """Counters read at one window edge, after the device was synchronised."""

    t_s: float  # host monotonic clock, midpoint of the counter reads
    energy_mj: dict[int, int] = field(default_factory=dict)
    energy_reason: dict[int, str] = field(default_factory=dict)
    cpu_time_s: float | None = None
    rapl_j: float | None = None
    rapl_reason: str | None = None
    rss_bytes: int | None = None
    rss_lifetime_peak_bytes: int | None = None


def read_edge(gpus: list[GpuSource], host: HostSource | None, clock) -> Edge:
    t_a = clock()
    energy, reasons = {}, {}
    for g in gpus:
        try:
            energy[g.index] = g.energy_mj()
        except Unavailable as exc:
            reasons[g.index] = exc.reason
    edge = Edge(t_s=(t_a + clock()) / 2, energy_mj=energy, energy_reason=reasons)
    if host is not None:
        edge.cpu_time_s = host.cpu_time_s()
        edge.rss_bytes = host.rss_bytes()
        edge.rss_lifetime_peak_bytes = host.rss_lifetime_peak_bytes()
        try:
            edge.rapl_j = host.rapl_energy_j()
        except Unavailable as exc:
            edge.rapl_reason = exc.reason
    return edge


@dataclass
class GpuContext:
    """What the window needs to know besides its edges."""

    gpus: list[GpuSource]
    sampler: Sampler | None
    gpu_reason: str | None  # why there is no GPU at all
    idle_power_w: float | None
    idle_reason: str | None
    min_window_s: float = MIN_WINDOW_S


def build(name: str, start: Edge, end: Edge, ctx: GpuContext, t0_s: float) -> Measurement:
    m = Measurement(name=name, duration_s=end.t_s - start.t_s, t_start_s=start.t_s - t0_s, t_end_s=end.t_s - t0_s)
    integrals = _power_fields(m, start, end, ctx)
    _energy_fields(m, start, end, ctx, integrals)
    _host_fields(m, start, end, ctx.sampler)
    m.confidence_reasons = confidence_reasons(m.duration_s, m.energy_j, m.energy_integral_j,
                                              m.n_counter_updates, ctx.min_window_s)
    m.low_confidence = bool(m.confidence_reasons)
    return m


def _power_fields(m: Measurement, start: Edge, end: Edge, ctx: GpuContext) -> dict[int, float]:
    """Sampled power, memory; returns the per-GPU power integrals that exist."""
    if not ctx.gpus:
        for key in ("energy_integral_j", "power_avg_w", "power_peak_w", "nvml_mem_used_gib"):
            m.unavailable[key] = ctx.gpu_reason or "no GPU"
        return {}
    if ctx.sampler is None:
        for key in ("energy_integral_j", "power_avg_w", "power_peak_w", "nvml_mem_used_gib"):
            m.unavailable[key] = "sampling disabled (sample_hz=0)"
        return {}
    if ctx.sampler.error is not None:
        m.notes.append(f"sampler stopped early: {ctx.sampler.error!r}")
    integrals, powers, updates, mem_peaks, missing, counter_updates = {}, [], [], [], [], []
    avg_w = []   # per GPU: its integral over the span it covers
    lo, hi = ctx.sampler.tick_range(start.t_s, end.t_s)
    m.n_samples = hi - lo
    for pos, g in enumerate(ctx.gpus):
        trace = ctx.sampler.traces[pos]
        first = max(0, lo - 1)
        t_all, v_all = ctx.sampler.gpu_rows(pos, first, hi + 1)  # one sample either side for the edges
        v_in = {f: v[lo - first:hi - first] for f, v in v_all.items()}
        counter = [x for x in v_in["energy_mj"] if x == x]   # counter reads inside the window
        if counter:
            counter_updates.append(count_updates(counter) - 1)
        mem = [x for x in v_in["mem_used_bytes"] if x == x]
        if mem:
            mem_peaks.append(max(mem))
        a, b = _counter_window(ctx.sampler, pos, g.index, lo, hi, start, end)
        if (a, b) != (start.t_s, end.t_s):
            t_all, v_all = ctx.sampler.gpu_rows(pos, first - _back_ticks(ctx.sampler), hi + 1)
        j = integrate_power_j(t_all, v_all["power_w"], a, b) if trace.power_source else None
        if j is None:
            missing.append(f"GPU {g.index}: {trace.reasons.get('power_w', 'no power sample in the window')}")
            continue
        if trace.power_source == "average":
            m.notes.append(f"GPU {g.index} power is nvmlDeviceGetPowerUsage, not instant power")
        integrals[g.index] = j
        avg_w.append(j / (b - a) if b > a else None)
        powers.append(v_in["power_w"])
        updates.append(count_updates(v_in["power_w"]))
    if len(counter_updates) == len(ctx.gpus):
        m.n_counter_updates = min(counter_updates)
    if mem_peaks:
        m.nvml_mem_used_gib = max(mem_peaks) / GIB
    else:
        m.unavailable["nvml_mem_used_gib"] = ctx.sampler.traces[0].reasons.get(
            "mem_used_bytes", "no memory sample in the window")
    if missing:
        for key in ("energy_integral_j", "power_avg_w", "power_peak_w"):
            m.unavailable[key] = "; ".join(missing)
        return integrals
    m.energy_integral_j = sum(integrals.values())
    m.n_power_updates = min(updates)
    if m.duration_s > 0 and None not in avg_w:
        m.power_avg_w = sum(avg_w)
    peaks = [p for p in sum_by_index(powers) if p == p]
    if peaks:
        m.power_peak_w = max(peaks)
    else:
        m.unavailable["power_peak_w"] = "no power sample inside the window"
    return integrals


def _back_ticks(sampler) -> int:
    return int(COUNTER_HORIZON_S / sampler.period_s) + 2


def _counter_window(sampler, pos: int, index: int, lo: int, hi: int, start: Edge, end: Edge) -> tuple[float, float]:
    """The span the counter's two edge readings really cover: NVML's counter moves in ~100 ms steps,
    so a reading holds the energy up to its last update, not up to the read. Where the sampler read
    the counter densely (every tick, <= ALIGN_MAX_GAP_S apart: the sampling process) the updates are
    placed between the reads around them, and the power integral is taken over exactly that span;
    otherwise (or for an edge it cannot place) over the edges' read times."""
    if index not in start.energy_mj or index not in end.energy_mj:
        return start.t_s, end.t_s
    t, v = sampler.gpu_rows(pos, max(0, lo - _back_ticks(sampler)), hi + 1)
    counter = v["energy_mj"]
    a = counter_update_time(t, counter, start.t_s, start.energy_mj[index], ALIGN_MAX_GAP_S, COUNTER_HORIZON_S)
    b = counter_update_time(t, counter, end.t_s, end.energy_mj[index], ALIGN_MAX_GAP_S, COUNTER_HORIZON_S)
    return (a if a is not None else start.t_s), (b if b is not None else end.t_s)


def _energy_fields(m: Measurement, start: Edge, end: Edge, ctx: GpuContext, integrals: dict[int, float]) -> None:
    problems = []
    for g in ctx.gpus:
        i = g.index
        if i not in start.energy_mj or i not in end.energy_mj:
            problems.append(f"GPU {i}: {start.energy_reason.get(i) or end.energy_reason.get(i)}")
        elif end.energy_mj[i] < start.energy_mj[i]:
            if i in integrals:
                m.energy_j_by_gpu[i] = integrals[i]
                m.notes.append(f"GPU {i} energy counter went backwards (driver reload or reset): "
                               "energy_j uses the power integral")
            else:
                problems.append(f"GPU {i}: energy counter went backwards and no power integral to fall back on")
        else:
            m.energy_j_by_gpu[i] = (end.energy_mj[i] - start.energy_mj[i]) / 1000.0
    if not ctx.gpus:
        problems.append(ctx.gpu_reason or "no GPU")
    if problems:
        m.energy_j_by_gpu = {}
        m.unavailable["energy_j"] = "; ".join(problems)
    else:
        m.energy_j = sum(m.energy_j_by_gpu.values())
    m.idle_power_w = ctx.idle_power_w
    base = m.energy_j if m.energy_j is not None else m.energy_integral_j
    if ctx.idle_power_w is None:
        m.unavailable["idle_power_w"] = ctx.idle_reason or "no idle baseline"
        m.unavailable["energy_above_idle_j"] = ctx.idle_reason or "no idle baseline"
    elif base is None:
        m.unavailable["energy_above_idle_j"] = "no window energy"
    else:
        m.energy_above_idle_j = above_idle_j(base, ctx.idle_power_w, m.duration_s)


def _host_fields(m: Measurement, start: Edge, end: Edge, sampler: Sampler | None) -> None:
    if start.cpu_time_s is None or end.cpu_time_s is None:
        for key in ("host_rss_peak_gib", "cpu_util_pct", "cpu_energy_j"):
            m.unavailable[key] = "no host source"
        return
    if m.duration_s > 0:
        m.cpu_util_pct = 100.0 * (end.cpu_time_s - start.cpu_time_s) / m.duration_s
    if start.rapl_j is not None and end.rapl_j is not None:
        m.cpu_energy_j = end.rapl_j - start.rapl_j
        failed = [why for t, why in (sampler.rapl_poll_failures if sampler else []) if start.t_s <= t <= end.t_s]
        if failed:
            m.notes.append(f"cpu_energy_j may miss a RAPL counter wrap: {len(failed)} poll(s) failed ({failed[0]})")
    else:
        m.unavailable["cpu_energy_j"] = end.rapl_reason or start.rapl_reason or "RAPL unreadable"
    candidates = [start.rss_bytes, end.rss_bytes]
    if sampler is not None:
        candidates.append(sampler.host_rss_max_bytes(start.t_s, end.t_s))
    lo, hi = start.rss_lifetime_peak_bytes, end.rss_lifetime_peak_bytes
    if lo is not None and hi is not None and hi > lo:
        candidates.append(hi)  # the process set a new high-water mark inside the window
    m.host_rss_peak_gib = max(c for c in candidates if c is not None) / GIB

"""docs/benchmarks.md and docs/benchmarks.png from one run's JSON record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

DOCS = Path(__file__).resolve().parent.parent / "docs"
MARKDOWN = DOCS / "benchmarks.md"
PLOT = DOCS / "benchmarks.png"
TABLE_START = "<!-- bench:table:start -->"
TABLE_END = "<!-- bench:table:end -->"


def _fmt(value: float) -> str:
    if value >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}" if value < 1 else f"{value:.1f}"


def _met(ratio: float, target: float, lower_is_better: bool = False) -> str:
    met = ratio <= target if lower_is_better else ratio >= target
    return "yes" if met else "**no**"


def table_rows(rows: dict[str, Any]) -> list[str]:
    lines = [
        "| id | measure | baseline (same run) | ours | ratio | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    if "P1" in rows:
        p1 = rows["P1"]
        cpu = p1["cpu_us_per_request"]
        lines.append(
            f"| P1 | signed deliveries verified + durably queued /s, one uvicorn process "
            f"(server CPU µs/delivery: {cpu['subject']:.0f} vs {cpu['baseline']:.0f}) "
            f"| bare Starlette 202: {_fmt(p1['baseline'])}/s | {_fmt(p1['subject'])}/s "
            f"| {p1['ratio']:.2f}x | ≥ 0.5x | {_met(p1['ratio'], 0.5)} |"
        )
        counted = p1.get("instructions_per_request")
        if isinstance(counted, dict):
            lines.append(
                f"| P1 work | same, user-space instructions per delivery (callgrind: no noise) "
                f"| bare: {counted['baseline'] / 1000:,.0f}k | {counted['subject'] / 1000:,.0f}k "
                f"| {counted['ratio']:.2f}x | (≥ 0.5x) | {_met(counted['ratio'], 0.5)} |"
            )
    handled = rows.get("P2", {})
    if "P2" in handled:
        p2, p2b = handled["P2"], handled["P2b"]
        lines.append(
            f"| P2 | edit-handler events handled /s, one worker, sandbox 100 ms/call "
            f"(handler {handled['handler_ms']:.0f} ms) | max_jobs ÷ handler time: "
            f"{_fmt(p2['baseline'])}/s | {_fmt(p2['subject'])}/s | {p2['ratio']:.2f}x | ≥ 0.8x "
            f"| {_met(p2['ratio'], 0.8)} |"
        )
        lines.append(
            f"| P2b | same | SDK model, one event at a time inline: {_fmt(p2b['baseline'])}/s "
            f"| {_fmt(p2b['subject'])}/s | {p2b['ratio']:.0f}x | ≥ 50x | {_met(p2b['ratio'], 50)} |"
        )
    elif "skipped" in handled:
        lines.append(f"| P2, P2b | not measured: {handled['skipped']} | | | | | |")
    if "P3" in rows:
        p3 = rows["P3"]
        ours, arq = p3["subject"], p3["baseline"]
        lines.append(
            f"| P3 | pick-up latency p50 / p99 at half of peak load "
            f"({ours['rate_per_s']:.0f}/s; arq at half its own peak, {arq['rate_per_s']:.0f}/s) "
            f"| arq defaults: {arq['p50_ms']:.0f} / {arq['p99_ms']:.0f} ms "
            f"| {ours['p50_ms']:.1f} / {ours['p99_ms']:.1f} ms | p99 {p3['ratio']:.3f}x "
            f"| p99 ≤ 0.05x | {_met(p3['ratio'], 0.05, lower_is_better=True)} |"
        )
    if "P4" in rows:
        p4 = rows["P4"]
        kept = ", ".join(f"{k}: {v:,}" for k, v in sorted(p4["redis_keys"].items()))
        lines.append(
            f"| P4 | worker RSS growth over {p4['events']:,} events; Redis after the drain "
            f"| start: {p4['rss_start_mb']:.1f} MB RSS | +{p4['rss_growth_mb']:.1f} MB RSS; "
            f"Redis +{p4['redis_growth_mb']:.1f} MB ({p4['redis_bytes_per_event']:.0f} B/event, "
            f"of which the event log {p4.get('event_log_mb', 0):.1f} MB), "
            f"keys: {kept} | | RSS < 20 MB; only the dedup window, the capped event log and "
            "handled states | "
            f"{'yes' if p4['passes'] else '**no**'} |"
        )
    if "P5" in rows:
        p5 = rows["P5"]
        lines.append(
            f"| P5 | events handled /s with 2 worker processes, handlers waiting "
            f"{p5['handler_wait_ms']:.0f} ms on I/O | 1 worker: {_fmt(p5['baseline'])}/s "
            f"| {_fmt(p5['subject'])}/s | {p5['ratio']:.2f}x | ≥ 1.7x | {_met(p5['ratio'], 1.7)} |"
        )
        if "no_op" in p5:
            no_op = p5["no_op"]
            lines.append(
                f"| P5 no-op | same, no-op handlers: pipeline CPU only, on 2 cores shared with "
                f"Redis | 1 worker: {_fmt(no_op['baseline'])}/s | {_fmt(no_op['subject'])}/s "
                f"| {no_op['ratio']:.2f}x | ≥ 1.7x | {_met(no_op['ratio'], 1.7)} |"
            )
            commands = no_op.get("redis_commands_per_event", {}).get("1 workers")
            if commands is not None:
                lines.append(
                    f"| P5 commands | Redis commands per handled event (INFO commandstats ÷ "
                    f"events; enqueue, claim, run, finish, the counting handler's INCR and the "
                    f"polls), 1 worker, no-op handler | 21.1 before issue 13 (427eda2, this "
                    f"harness) "
                    f"| {commands:.1f} | | report | |"
                )
    lines += _p6_rows(rows.get("P6"))
    lines += _p7_rows(rows.get("P7"))
    lines += _p8_rows(rows.get("P8"))
    return lines


def _p8_rows(p8: dict[str, Any] | None) -> list[str]:
    if p8 is None:
        return []
    return [
        f"| P8 console | receiver p99 while {p8['operators']} operators search the whole event "
        f"log ({p8['log_entries']:,} entries; {p8['searches']} searches; Redis "
        f"{p8['redis_us_per_script_call']:,.0f} µs per slice) | alone: "
        f"{p8['p99_ms_alone']:.1f} ms | {p8['p99_ms_searching']:.1f} ms | {p8['ratio']:.2f}x "
        f"| ≤ {p8['target']:g}x | {_met(p8['ratio'], p8['target'], lower_is_better=True)} |"
    ]


def _p7_rows(p7: dict[str, Any] | None) -> list[str]:
    if p7 is None:
        return []
    ack, cost, lease = p7["replica_ack"], p7["redis_per_event"], p7["lease_recovery"]
    rates = ack["rates"]
    top = ", ".join(f"{name} {n:.2g}" for name, n in list(cost["commands"].items())[:6])
    return [
        f"| P7 ack | P1 against a primary with one local replica, "
        f"HRFLOW_REDIS_MIN_REPLICAS_ACK=1 (WAIT after each batch) | bare Starlette 202: "
        f"{_fmt(rates['bare'])}/s; without ack {_fmt(rates['no ack'])}/s "
        f"({ack['p1_ratio_no_ack']:.2f}x) | {_fmt(rates['ack 1'])}/s "
        f"| {ack['p1_ratio_ack_1']:.2f}x ({ack['ack_1_vs_no_ack']:.2f}x of no ack) | report "
        f"| |",
        f"| P7 Redis | Redis per handled event end to end (receiver + 1 worker, no-op "
        f"handler): CPU and commands (INFO cpu, commandstats: {top}, ...) | | "
        f"{cost['redis_cpu_us_per_event']:.0f} µs, {cost['redis_commands_per_event']:.1f} "
        f"commands; worker CPU {cost['worker_cpu_ms_per_event']:.2f} ms | | report | |",
        f"| P7 lease | a SIGKILLed worker's {lease['held_runs']} runs of "
        f"{lease['handler_s']:.0f} s handlers done on the other worker | arq's expiry: "
        f"{lease['arq_expiry_bound_s']:.0f} s (job timeout + 10 s + handler) "
        f"| {lease['median_s']:.1f} s | | ≤ lease + handler ({lease['bound_s']:.0f} s) "
        f"| {_met(lease['median_s'], lease['bound_s'], lower_is_better=True)} |",
    ]


def _p6_rows(p6: dict[str, Any] | None) -> list[str]:
    if p6 is None:
        return []
    calm = p6["scenarios"]["no attack"]
    lines = []
    for name, result in p6["scenarios"].items():
        if name == "no attack":
            continue
        lines.append(
            f"| P6 {name} | good deliveries under attack, deployed web line, 1,024 open files "
            f"(success, p99) | no attack: {calm['success_rate']:.0%}, {calm['p99_ms']:.0f} ms "
            f"| {result['success_rate']:.0%}, {result['p99_ms']:.0f} ms "
            f"| {result['success_ratio']:.2f}x, p99 {result['p99_ratio']:.1f}x "
            f"| success 1.00x | {_met(result['success_ratio'], 1.0)} |"
        )
    rejection = p6["rejection"]
    lines.append(
        f"| P6 rejection | receiver CPU per refused bad-signature delivery, "
        f"{rejection['payload_bytes'] // 1024} KB payload in the header "
        f"| accepted, same size: {rejection['accept_cpu_us']:,.0f} µs "
        f"| {rejection['refuse_cpu_us']:,.0f} µs | {rejection['ratio']:.2f}x | ≤ 1x "
        f"| {_met(rejection['ratio'], 1.0, lower_is_better=True)} |"
    )
    return lines


def write_table(record: dict[str, Any]) -> None:
    """Replace the table between the markers, keeping the hand-written text around it."""
    header = (
        f"Run of {record['when']} ({record['mode']}, {record['machine']['cpus']} CPUs, "
        f"Python {record['machine']['python']}, {record['duration_s']:.0f} s):"
    )
    block = "\n".join([TABLE_START, header, "", *table_rows(record["rows"]), TABLE_END])
    text = (
        MARKDOWN.read_text()
        if MARKDOWN.exists()
        else f"# Benchmarks\n\n{TABLE_START}\n{TABLE_END}\n"
    )
    before, _, rest = text.partition(TABLE_START)
    _, _, after = rest.partition(TABLE_END)
    MARKDOWN.write_text(before + block + after)


def write_plot(record: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = record["rows"]
    figure, (throughput, latency) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels, baselines, ours = [], [], []
    for row, name in (("P1", "P1 ingest (bare 202)"), ("P5", "P5 2 workers (1 worker)")):
        if row in rows:
            labels.append(name)
            baselines.append(rows[row]["baseline"])
            ours.append(rows[row]["subject"])
    if "P2" in rows.get("P2", {}):
        labels.append("P2 edit handler (bound)")
        baselines.append(rows["P2"]["P2"]["baseline"])
        ours.append(rows["P2"]["P2"]["subject"])
    positions = range(len(labels))
    throughput.bar([p - 0.2 for p in positions], baselines, 0.4, label="baseline (in brackets)")
    throughput.bar([p + 0.2 for p in positions], ours, 0.4, label="hrflow-webhooks")
    throughput.set_xticks(list(positions), labels)
    throughput.set_ylabel("per second")
    throughput.set_yscale("log")
    throughput.set_title("Throughput (baseline measured in the same run)")
    throughput.legend()
    if "P3" in rows:
        p3 = rows["P3"]
        names = ["p50", "p99"]
        arq = [p3["baseline"]["p50_ms"], p3["baseline"]["p99_ms"]]
        mine = [p3["subject"]["p50_ms"], p3["subject"]["p99_ms"]]
        latency.bar([0 - 0.2, 1 - 0.2], arq, 0.4, label="arq defaults")
        latency.bar([0 + 0.2, 1 + 0.2], mine, 0.4, label="hrflow-webhooks")
        latency.set_xticks([0, 1], names)
        latency.set_yscale("log")
        latency.set_ylabel("ms, receipt → handler start")
        latency.set_title("P3 pick-up latency at half of peak load")
        latency.legend()
    figure.suptitle(f"hrflow-webhooks benchmarks, {record['when']} ({record['mode']})")
    figure.tight_layout()
    figure.savefig(PLOT, dpi=100)
    plt.close(figure)


def write_docs(record: dict[str, Any]) -> None:
    DOCS.mkdir(exist_ok=True)
    write_table(record)
    write_plot(record)

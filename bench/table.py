"""The one table every benchmark prints: figure, ours, baseline, ratio, unit (Markdown, pastes into the README)."""


def fmt(value):
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def print_table(rows, with_bench=False):
    head = ["bench"] * with_bench + ["figure", "ours", "baseline", "ratio", "unit"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in rows:
        cells = ([r["bench"]] if with_bench else []) + [r["figure"].replace("|", "\\|"), fmt(r["ours"]),
                                                        fmt(r["baseline"]), fmt(r.get("ratio")), r.get("unit", "")]
        print("| " + " | ".join(cells) + " |")

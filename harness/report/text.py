"""The fixed-width table a run logs when it finishes: accuracy and error per domain with their mean, and the
paper's number and the difference beside each domain it reports."""
from __future__ import annotations

from harness.results import summarise


def format_table(records: list[dict], domain_label: str = "corruption", show_severity: bool | None = None,
                 reference: dict | None = None, reference_label: str = "paper", complete: bool = True) -> str:
    """Per-domain accuracy and error (%), with the mean, as a fixed-width text table.

    show_severity: None = only when some record has a severity (data sets without severities record 0).
    complete: False for a run that has not finished every task: its mean line shows no mean.
    reference: {domain: accuracy in %} (e.g. the paper's row): adds that column and the difference
    (measured - reference, in accuracy points) for the domains it has; its mean is over those domains."""
    if show_severity is None:
        show_severity = any(int(r["severity"]) != 0 for r in records)
    width = max([len(domain_label), 4] + [len(r["domain"]) for r in records]) + 2
    sev = (lambda v: f"{v:>4}") if show_severity else (lambda v: "")
    ref_width = len(reference_label) + 9
    head = f"{domain_label:<{width}}{sev('sev')}{'n':>8}{'acc %':>9}{'err %':>9}"
    if reference is not None:
        head += f"{reference_label + ' acc %':>{ref_width}}{'diff':>8}"
    lines = [head]
    matched = []
    for r in records:
        line = (f"{r['domain']:<{width}}{sev(r['severity'])}{r['n']:>8}{100 * r['accuracy']:>9.2f}"
                f"{100 * r['error']:>9.2f}")
        if reference is not None:
            value = reference.get(r["domain"])
            if value is None:
                line += f"{'-':>{ref_width}}{'-':>8}"
            else:
                matched.append((100 * r["accuracy"], value))
                line += f"{value:>{ref_width}.2f}{100 * r['accuracy'] - value:>+8.2f}"
        lines.append(line)
    s = summarise(records)
    if not complete:
        lines.append(f"{'mean':<{width}}{sev('')}{s['n_total']:>8}{'-':>9}{'-':>9}  (incomplete run: no mean)")
        return "\n".join(lines)
    line = (f"{'mean':<{width}}{sev('')}{s['n_total']:>8}{100 * s['mean_accuracy']:>9.2f}"
            f"{100 * s['mean_error']:>9.2f}")
    if reference is not None and matched:
        ours = sum(m for m, _ in matched) / len(matched)
        theirs = sum(p for _, p in matched) / len(matched)
        line += f"{theirs:>{ref_width}.2f}{ours - theirs:>+8.2f}"
        if len(matched) < len(records):
            line += f"  (over the {len(matched)} domains with a {reference_label} value)"
    lines.append(line)
    return "\n".join(lines)

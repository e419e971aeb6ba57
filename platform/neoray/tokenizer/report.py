"""Token counts of several tokenizers over corpus components: a table and a bar plot.

This is how to check a claim like "the NeoX tokenizer needs 23% fewer tokens on GitHub code"
on one's own data: same documents, different tokenizers, per component (code, prose, ...).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from neoray.config import ConfigError
from neoray.corpus import iter_texts
from neoray.tokenizer.load import TextTokenizer, load_tokenizer


@dataclass
class TokenReportConfig:
    """`tokenizers`: name -> tokenizer.json (or `gpt-neox-20b`); the first is the baseline.
    `corpora`: component name -> inputs (paths, globs, s3:// URIs)."""

    tokenizers: dict[str, str]
    corpora: dict[str, list[str]]
    output_dir: str = "runs/token_report"
    text_field: str = "text"
    batch_size: int = 256

    def __post_init__(self) -> None:
        if len(self.tokenizers) < 1:
            raise ConfigError("token_report.tokenizers: name at least one tokenizer")
        if not self.corpora:
            raise ConfigError("token_report.corpora: give at least one component: name -> inputs")


@dataclass
class TokenCount:
    documents: int = 0
    bytes: int = 0
    tokens: int = 0

    @property
    def bytes_per_token(self) -> float:
        return self.bytes / max(self.tokens, 1)


@dataclass
class TokenReport:
    tokenizers: list[str]
    # counts[component][tokenizer]
    counts: dict[str, dict[str, TokenCount]] = field(default_factory=dict)

    def ratio(self, component: str, tokenizer: str) -> float:
        """Tokens of `tokenizer` relative to the baseline (first) tokenizer on `component`."""
        row = self.counts[component]
        return row[tokenizer].tokens / max(row[self.tokenizers[0]].tokens, 1)


def _batches(texts: Iterator[str], size: int) -> Iterator[list[str]]:
    batch: list[str] = []
    for text in texts:
        batch.append(text)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def count_tokens(
    tokenizer: TextTokenizer, inputs: Sequence[str], text_field: str = "text", batch_size: int = 256
) -> TokenCount:
    """Documents, UTF-8 bytes and tokens (no end-of-text tokens) of a corpus, streamed."""
    count = TokenCount()
    for batch in _batches(iter_texts(inputs, text_field), batch_size):
        count.documents += len(batch)
        count.bytes += sum(len(text.encode("utf-8")) for text in batch)
        count.tokens += sum(len(ids) for ids in tokenizer.encode_batch(batch))
    return count


def build_report(cfg: TokenReportConfig) -> TokenReport:
    report = TokenReport(list(cfg.tokenizers))
    loaded = {name: load_tokenizer(source) for name, source in cfg.tokenizers.items()}
    for component, inputs in cfg.corpora.items():
        report.counts[component] = {
            name: count_tokens(tok, inputs, cfg.text_field, cfg.batch_size)
            for name, tok in loaded.items()
        }
    return report


def format_table(report: TokenReport) -> str:
    """A Markdown table: tokens and bytes/token per tokenizer, and tokens vs the baseline."""
    base = report.tokenizers[0]
    header = ["component", "documents", "MB"]
    for name in report.tokenizers:
        header += [f"{name} tokens", f"{name} bytes/token"]
    header += [f"{name} / {base}" for name in report.tokenizers[1:]]
    rows = [header, ["---"] * len(header)]
    for component, counts in report.counts.items():
        first = counts[base]
        row = [component, f"{first.documents:,}", f"{first.bytes / 1e6:.2f}"]
        for name in report.tokenizers:
            row += [f"{counts[name].tokens:,}", f"{counts[name].bytes_per_token:.2f}"]
        row += [f"{report.ratio(component, name):.3f}" for name in report.tokenizers[1:]]
        rows.append(row)
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plot_report(report: TokenReport, path: str) -> None:
    """Grouped bars: bytes per token (compression) per component for each tokenizer.

    Bytes per token rather than raw counts, so that small components stay readable next to big ones.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    components = list(report.counts)
    width = 0.8 / len(report.tokenizers)
    fig, ax = plt.subplots(figsize=(1.5 + 2 * len(components), 4))
    for i, name in enumerate(report.tokenizers):
        compression = [report.counts[c][name].bytes_per_token for c in components]
        ax.bar(np.arange(len(components)) + i * width, compression, width, label=name)
    ax.set_xticks(np.arange(len(components)) + width * (len(report.tokenizers) - 1) / 2)
    ax.set_xticklabels(components)
    ax.set_ylabel("UTF-8 bytes per token")
    ax.set_title("compression per corpus component (higher is better)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(cfg: TokenReportConfig) -> tuple[TokenReport, str]:
    """Count, then write `token_report.md` and `token_report.png` to `cfg.output_dir`."""
    report = build_report(cfg)
    table = format_table(report)
    os.makedirs(cfg.output_dir, exist_ok=True)
    with open(os.path.join(cfg.output_dir, "token_report.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")
    plot_report(report, os.path.join(cfg.output_dir, "token_report.png"))
    return report, table

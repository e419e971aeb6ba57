"""The token report: counts per component and tokenizer, as a table and a bar plot."""

import json

from neoray.tokenizer.load import RELEASED_20B, load_tokenizer
from neoray.tokenizer.report import TokenReportConfig, write_report


def test_report_counts_every_document_with_every_tokenizer(demo_data, tmp_path):
    corpora = {name: c.input for name, c in demo_data.components.items()}
    cfg = TokenReportConfig(
        tokenizers={"neox20b": RELEASED_20B, "demo": demo_data.tokenizer},
        corpora=corpora,
        output_dir=str(tmp_path),
    )
    report, table = write_report(cfg)
    for component, inputs in corpora.items():
        with open(inputs[0]) as f:
            texts = [json.loads(line)["text"] for line in f]
        for name, source in cfg.tokenizers.items():
            tok = load_tokenizer(source)
            count = report.counts[component][name]
            assert count.tokens == sum(len(tok.encode(t)) for t in texts)
            assert count.documents == len(texts)
            assert count.bytes == sum(len(t.encode()) for t in texts)
        ratio = report.counts[component]["demo"].tokens / report.counts[component]["neox20b"].tokens
        assert report.ratio(component, "demo") == ratio
        assert f"| {component} | {len(texts):,} |" in table
        assert f"{ratio:.3f} |" in table
    assert (tmp_path / "token_report.md").read_text().strip() == table
    assert (tmp_path / "token_report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

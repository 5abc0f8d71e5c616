"""Trace parsing (the real Azure file and malformed ones), windowing, time scaling, caps, synthetic traces."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dsla_serve.bench import trace as tr

AZURE = Path(__file__).resolve().parents[3] / "shared" / "traces" / "AzureLLMInferenceTrace_conv.csv"
HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"
GOOD = "2023-11-16 18:15:46.6805900,374,44\n"


@pytest.fixture(scope="module")
def azure() -> tr.Trace:
    if not AZURE.is_file():
        pytest.skip(f"{AZURE} is not on this machine")
    return tr.read_azure(AZURE)


def test_real_trace_matches_its_readme(azure):
    # README: 19,366 requests over about one hour, mean context 1,155, mean generation 211,
    # 86.0 % of prompts < 2k tokens, 11.8 % 2k-4k, 2.1 % 4k-8k.
    st = azure.stats()
    assert st["requests"] == 19366
    assert 3000 < st["duration_s"] < 3700
    assert st["prompt_tokens_mean"] == pytest.approx(1155, abs=1)
    assert st["output_tokens_mean"] == pytest.approx(211, abs=1)
    shares = tr.bucket_shares(azure, tr.PAPER_MIX)
    assert shares[:3] == pytest.approx([0.860, 0.118, 0.021], abs=0.001)
    arrivals = [r.arrival_s for r in azure.requests]
    assert arrivals[0] == 0 and arrivals == sorted(arrivals)
    first = azure.requests[0]
    assert (first.prompt_tokens, first.output_tokens, first.line) == (374, 44, 2)
    assert "CC BY 4.0" in azure.attribution


@pytest.mark.parametrize(
    ("row", "needle"),
    [
        ("2023-11-16 18:15:47.0,abc,44\n", "ContextTokens 'abc' is not an integer"),
        ("2023-11-16 18:15:47.0,12,-3\n", "GeneratedTokens -3 is negative"),
        ("2023-11-16 18:15:47.0,12\n", "expected 3 fields"),
        ("yesterday,12,3\n", "TIMESTAMP 'yesterday' is not a date-time"),
    ],
)
def test_malformed_row_names_its_line(tmp_path, row, needle):
    path = tmp_path / "bad.csv"
    path.write_text(HEADER + GOOD + GOOD + row + GOOD)
    with pytest.raises(tr.TraceError) as e:
        tr.read_azure(path)
    assert f"{path}:4:" in str(e.value) and needle in str(e.value)


def test_bad_header_empty_and_missing_files(tmp_path):
    (tmp_path / "h.csv").write_text("time,prompt,output\n" + GOOD)
    with pytest.raises(tr.TraceError, match=r"h.csv:1: expected the header"):
        tr.read_azure(tmp_path / "h.csv")
    (tmp_path / "e.csv").write_text(HEADER + "\n")
    with pytest.raises(tr.TraceError, match="no requests"):
        tr.read_azure(tmp_path / "e.csv")
    with pytest.raises(tr.TraceError, match="does not exist"):
        tr.read_azure(tmp_path / "missing.csv")


def test_unsorted_rows_are_sorted_and_keep_their_lines(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text(HEADER + "2023-11-16 18:00:02.5,30,3\n2023-11-16 18:00:00.0,10,1\n2023-11-16 18:00:01,20,2\n")
    t = tr.read_azure(path)
    assert [(r.arrival_s, r.prompt_tokens, r.line) for r in t.requests] == [(0, 10, 3), (1, 20, 4), (2.5, 30, 2)]
    assert t.attribution is None  # not the Azure file


def test_window_scale_and_caps(azure):
    w = tr.window(azure, start=100, limit=50)
    assert len(w) == 50 and w.requests[0].arrival_s == 0
    src = azure.requests[100:150]
    gaps = np.diff([r.arrival_s for r in w.requests])
    assert gaps == pytest.approx(np.diff([r.arrival_s for r in src]))
    assert [r.line for r in w.requests] == [r.line for r in src]
    s = tr.scale_time(w, 4.0)
    assert s.duration_s == pytest.approx(4 * w.duration_s)
    c = tr.cap_lengths(s, context=1024, max_prompt=512, max_output=64)
    assert all(r.prompt_tokens <= 512 and r.output_tokens <= 64 for r in c.requests)
    assert all(r.prompt_tokens + r.output_tokens <= 1024 for r in c.requests)
    assert [r.arrival_s for r in c.requests] == [r.arrival_s for r in s.requests]
    unchanged = [
        a for a, b in zip(s.requests, c.requests, strict=True) if a.prompt_tokens <= 512 and a.output_tokens <= 64
    ]
    assert unchanged and all(a in c.requests for a in unchanged)
    assert c.transforms[0].startswith("window start=100") and c.transforms[1] == "time x4"
    assert "requests changed" in c.transforms[2]


def test_cap_to_context_only_clips_output_last(azure):
    t = tr.cap_lengths(tr.window(azure, 0, 2000), context=2048)
    assert max(r.prompt_tokens for r in t.requests) == 2047
    assert all(r.prompt_tokens + r.output_tokens <= 2048 and r.output_tokens >= 1 for r in t.requests)


def test_window_and_option_errors(azure):
    with pytest.raises(tr.TraceError, match="past the end"):
        tr.window(azure, start=19366)
    with pytest.raises(tr.TraceError, match="limit >= 1"):
        tr.window(azure, limit=0)
    with pytest.raises(tr.TraceError, match="positive"):
        tr.scale_time(azure, 0)
    with pytest.raises(tr.TraceError, match="bad bucket"):
        tr.parse_mix("0-2048:60,oops")
    with pytest.raises(tr.TraceError, match="LO < HI"):
        tr.parse_mix("4096-2048:1")
    with pytest.raises(tr.TraceError, match="poisson"):
        tr.synthetic(10, 1.0, arrival="uniform")


@pytest.mark.parametrize(("arrival", "cv2"), [("poisson", 1.0), ("bursty", 4.0)])
def test_synthetic_statistics(arrival, cv2):
    t = tr.synthetic(20000, rate=2.0, arrival=arrival, mix="paper", output_mean=211, seed=3)
    gaps = np.diff([r.arrival_s for r in t.requests])
    assert gaps.mean() == pytest.approx(0.5, rel=0.05)
    assert (gaps.std() / gaps.mean()) ** 2 == pytest.approx(cv2, rel=0.15)
    shares = tr.bucket_shares(t, tr.PAPER_MIX)
    assert shares == pytest.approx([0.6468, 0.1616, 0.1603, 0.031], abs=0.012)
    assert np.mean([r.output_tokens for r in t.requests]) == pytest.approx(211, rel=0.04)
    assert min(r.prompt_tokens for r in t.requests) >= 1


def test_synthetic_is_seeded_and_round_trips_through_csv(tmp_path):
    a = tr.synthetic(50, rate=1.0, arrival="bursty", mix="0-100:1,100-200:3", seed=7)
    b = tr.synthetic(50, rate=1.0, arrival="bursty", mix="0-100:1,100-200:3", seed=7)
    c = tr.synthetic(50, rate=1.0, arrival="bursty", mix="0-100:1,100-200:3", seed=8)
    assert a.requests == b.requests and a.requests != c.requests
    assert all(1 <= r.prompt_tokens < 200 for r in a.requests)
    tr.write_azure(a, tmp_path / "s.csv")
    back = tr.read_azure(tmp_path / "s.csv")
    assert [(r.prompt_tokens, r.output_tokens) for r in back.requests] == [
        (r.prompt_tokens, r.output_tokens) for r in a.requests
    ]
    assert [r.arrival_s for r in back.requests] == pytest.approx([r.arrival_s for r in a.requests], abs=1e-5)

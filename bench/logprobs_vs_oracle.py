"""How close imp serve's logprobs are to the reference: the engine's log-softmax of the first
answer token (what `logprobs` returns) against transformers' on the same tiny weights (the
oracle), over four questions. tests/test_serve_fields.py asserts 0.02 nats; this prints the
measured worst case.

    PYTHONPATH=. .venv/bin/python bench/logprobs_vs_oracle.py
"""

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests")); sys.path.insert(0, str(ROOT))
import numpy as np
from PIL import Image
from factory import make_checkpoint, make_photo
from oracle import Oracle
from convert.pipeline import convert
from imp_cli.engine import Sampling
from imp_cli.images import load_image
from imp_cli.modelfiles import read_pair
from imp_cli.session import Session
tmp = Path(tempfile.mkdtemp())
ck = make_checkpoint(tmp / "ck", layout="new", dtype="float16", aspect="square")
r = convert(str(ck), tmp / "out", quant="F16", mmproj_type="F16")
make_photo(tmp / "p.png")  # the test suite's photo
oracle = Oracle(ck)
worst = 0
for q in ["What is in the image?", "Describe the picture.", "What colour is it?", "Is there a cat?"]:
    with Session(read_pair(Path(r.text_path), Path(r.mmproj_path)), threads=1, ctx=512) as s:
        st = s.stage(load_image(str(tmp / "p.png")))
        a = s.answer(st, q, sampling=Sampling(logprobs=5), max_tokens=1).collect()
    lg = oracle.first_logits(Image.open(tmp / "p.png").convert("RGB"), q).astype(np.float64)
    want = lg - lg.max() - np.log(np.exp(lg - lg.max()).sum())
    tok, lp, top = a.logprobs[0]
    d = max([abs(lp - want[tok])] + [abs(l - want[t]) for t, l in top])
    worst = max(worst, d)
    print(q, tok, lp, want[tok], d)
print("max abs difference (nats):", worst)

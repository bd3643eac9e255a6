"""The obvious alternative: a plain FastAPI + open_clip + FAISS server, written the way the
open_clip README encodes text, one request at a time. The load benchmark runs it side by side
with xmodal. Run: python bench/baseline_server.py --port 8100 [--model ViT-B-32] [--n 1000]"""

from __future__ import annotations

import argparse

import faiss
import numpy as np
import open_clip
import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="ViT-B-32")
parser.add_argument("--pretrained", default=None, help="tag or file; default random weights")
parser.add_argument("--n", type=int, default=1000, help="vectors in the index")
parser.add_argument("--port", type=int, default=8100)
parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
args = parser.parse_args()
if args.model.startswith("xmodal-"):  # the project's own tiny config, for quick runs
    from models.factory import register_builtin_configs

    register_builtin_configs()

model, _, preprocess = open_clip.create_model_and_transforms(args.model, pretrained=args.pretrained)
model = model.to(args.device).eval()
tokenizer = open_clip.get_tokenizer(args.model)
with torch.no_grad():  # CoCa models keep the projection inside their text tower
    dim = int(model.encode_text(tokenizer(["x"]).to(args.device)).shape[-1])
vectors = np.random.default_rng(0).normal(size=(args.n, dim)).astype("float32")
faiss.normalize_L2(vectors)
index = faiss.IndexFlatIP(dim)
index.add(vectors)
app = FastAPI()


class Query(BaseModel):
    query: str
    k: int = 10


@app.post("/v1/search/text")
def search(q: Query) -> dict:
    with torch.no_grad():
        features = model.encode_text(tokenizer([q.query]).to(args.device))
        features /= features.norm(dim=-1, keepdim=True)
    scores, ids = index.search(features.float().cpu().numpy(), q.k)
    return {
        "results": [
            {"id": int(i), "score": float(s)} for s, i in zip(scores[0], ids[0], strict=True)
        ]
    }


@app.get("/readyz")
def ready() -> dict:
    return {"status": "ready"}


uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")

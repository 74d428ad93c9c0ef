#!/usr/bin/env bash
# Rebuild rgemma's bundled chat model (src/rgemma/assets/bundled-chat/) from the bundled
# base model and the corpus, in one command:
#
#   1. dialogue data: scripts/build_chat_data.py -> runs/chat_data/{train,valid}.jsonl
#   2. LoRA fine-tune: rgemma train --config configs/chat_lora.json -> runs/chat_lora/
#      (final/ is the merged model, final/adapter/ the PEFT adapter)
#   3. package: the merged model in bfloat16 (as the base), its tokenizer, the data
#      licence, training.json (provenance) and a held-out sample for the tests
#   4. evaluate: scripts/eval_chat.py on every held-out dialogue -> eval.json
#
#   bash scripts/build_chat_model.sh               # everything (about 10 minutes on 2 CPU cores)
#   SKIP_TRAIN=1 bash scripts/build_chat_model.sh  # package + evaluate an existing runs/chat_lora
set -euo pipefail
cd "$(dirname "$0")/.."

python scripts/build_chat_data.py --out runs/chat_data
if [ -z "${SKIP_TRAIN:-}" ]; then
    # --resume continues a stopped run; a finished run is left as it is.
    if [ -d runs/chat_lora/checkpoints ]; then
        rgemma train --config configs/chat_lora.json --resume
    else
        rgemma train --config configs/chat_lora.json
    fi
fi

python - <<'PY'
import hashlib, json, shutil
from pathlib import Path
import torch
import rgemma
from rgemma.checkpoint import bundled_model_path

run, data = Path("runs/chat_lora"), Path("runs/chat_data")
out = bundled_model_path(chat=True)
base = bundled_model_path()
cfg = json.loads(Path("configs/chat_lora.json").read_text())
model = rgemma.load_model(run / "final", dtype=torch.bfloat16)  # shipped in bfloat16
rgemma.save_model(model, out, tokenizer_path=base / "tokenizer.model")
shutil.copy("data/LICENSES.md", out / "LICENSE-DATA.md")
events = [json.loads(line) for line in open(run / "metrics.jsonl")]
end = [e for e in events if e.get("event") == "end"][-1]
adapter = run / "final" / "adapter"
(out / "training.json").write_text(json.dumps({
    "base": "src/rgemma/assets/bundled",
    "base_sha256": hashlib.sha256((base / "model.safetensors").read_bytes()).hexdigest(),
    "config": "configs/chat_lora.json",
    "lora": {k: cfg[k] for k in ("lora_rank", "lora_alpha")} | {
        "targets": json.loads((adapter / "adapter_config.json").read_text())["target_modules"],
        "adapter_bytes": sum(f.stat().st_size for f in adapter.iterdir()),
    },
    "data": json.loads((data / "manifest.json").read_text()),
    "steps": end["step"],
    "tokens_seen": end["tokens_seen"],
    "final_val_loss": end.get("val_loss"),  # held-out dialogues, model turns only
    "elapsed_s_all_sessions": sum(e["elapsed_s"] for e in events if e.get("event") == "end"),
}, indent=2) + "\n")
PY
# A spread of held-out dialogues for tests/test_bundled_chat.py (every 14th).
awk 'NR % 14 == 1' runs/chat_data/valid.jsonl > tests/data/chat_heldout.jsonl
python scripts/eval_chat.py --model src/rgemma/assets/bundled-chat \
    --data runs/chat_data/valid.jsonl --out src/rgemma/assets/bundled-chat/eval.json

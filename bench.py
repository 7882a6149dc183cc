"""
Benchmark: our training step and sampler against transformers + PEFT on the same model, the same
conversations and the same lengths, side by side in one run.

    python bench.py --json out/bench.json                        # random weights, Qwen2.5-0.5B's shape
    python bench.py --shape 0.5b-4l --device cpu --json bench.json   # 4 layers: fits a CPU's patience
    python bench.py --model Qwen/Qwen2.5-7B-Instruct --device cuda

Train: one optimizer step = 16 synthetic conversations (prompt 40-80 tokens, answer 60-250), all-module
rank-1 LoRA, AdamW. Ours packs the step into rows and computes the loss only at answer tokens;
the reference does what TRL's SFT loop does: micro-batches of 2, right-padded, labels masked to the
answer, HF's loss, 8 accumulation steps. Tokens/s counts real (unpadded) tokens for both.
Sample: the same prompts, n samples each, exactly --new-tokens new tokens (stop tokens ignored so both
produce the same lengths), temperature 1: ours (sample.generate) vs HF's model.generate.
Weights are random unless --model is given: speed does not depend on their values.
"""
import argparse
import os
import platform
import time

import torch

import train
from lora import add_lora
from model import Config, Qwen2, load, resolve_dtype

SHAPES = {  # (hidden, layers, heads, kv heads, intermediate, vocab rows, tied) from the Qwen2.5 configs
    "tiny": (64, 2, 4, 2, 128, 2048, True),  # smoke test
    "0.5b": (896, 24, 14, 2, 4864, 151936, True),
    "0.5b-4l": (896, 4, 14, 2, 4864, 151936, True),
    "1.5b": (1536, 28, 12, 2, 8960, 151936, True),
    "7b": (3584, 28, 28, 4, 18944, 152064, False),
}


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="hub id or HF directory (default: random weights of --shape)")
    p.add_argument("--shape", default="0.5b", choices=sorted(SHAPES), help="shape of the random model")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="bfloat16 or float32 (default: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--steps", type=int, default=3, help="timed optimizer steps (after one warm-up step)")
    p.add_argument("--convs", type=int, default=16, help="conversations per optimizer step")
    p.add_argument("--prompts", type=int, default=8, help="sampling: distinct prompts")
    p.add_argument("--n", type=int, default=4, help="sampling: samples per prompt")
    p.add_argument("--new-tokens", type=int, default=64, help="sampling: new tokens per sample")
    p.add_argument("--skip", default="", help="comma list of parts to skip: train, sample")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    return p.parse_args(argv)


def random_models(shape, device, dtype, seed):
    """Ours and transformers' Qwen2ForCausalLM with the same random weights."""
    from transformers import Qwen2Config, Qwen2ForCausalLM
    hidden, layers, heads, kv, inter, vocab, tied = SHAPES[shape]
    cfg = Config(vocab, hidden, inter, layers, heads, kv, hidden // heads, 1e-6, 1e6, 32768, tied, name_or_path=f"random-{shape}")
    torch.manual_seed(seed)
    with torch.device(device):
        ours = Qwen2(cfg).to(dtype)
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.02)
    ref_cfg = Qwen2Config(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                          num_key_value_heads=kv, intermediate_size=inter, tie_word_embeddings=tied,
                          rope_theta=1e6, max_position_embeddings=32768, rms_norm_eps=1e-6)
    ref = Qwen2ForCausalLM(ref_cfg).to(device=device, dtype=dtype)
    ref.load_state_dict(ours.state_dict(), strict=False)
    ref.tie_weights()
    return ours.requires_grad_(False).eval(), ref.requires_grad_(False).eval()


def loaded_models(name, device, dtype):
    from transformers import Qwen2ForCausalLM
    from model import local_dir
    ours, _ = load(name, device, dtype)
    ref = Qwen2ForCausalLM.from_pretrained(local_dir(name), dtype=dtype).to(device)
    return ours, ref.requires_grad_(False).eval()


def synthetic_conversations(n, vocab, seed):
    """(ids, loss mask) pairs of chat-like lengths; ids avoid the top rows (special and padding)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        p, a = int(torch.randint(40, 81, (1,), generator=g)), int(torch.randint(60, 251, (1,), generator=g))
        ids = torch.randint(0, vocab - 1000, (p + a,), generator=g).tolist()
        out.append((ids, [0] * p + [1] * a))
    return out


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_steps(step_fn, steps, device):
    step_fn()  # warm-up: allocator, kernels, autotuning
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step_fn()
    sync(device)
    return time.perf_counter() - t0


def bench_train_ours(model, convs_per_step, args):
    add_lora(model, r=1, alpha=64)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=torch.device(args.device).type == "cuda")
    model.train()

    def step():
        train.accumulate_grads(model, model.hidden, train.pack(convs_per_step, 2048), [], 0.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(step, args.steps, args.device)


def bench_train_ref(ref, convs_per_step, args, micro=2):
    from peft import LoraConfig, get_peft_model
    peft_model = get_peft_model(ref, LoraConfig(r=1, lora_alpha=64, use_rslora=True, lora_dropout=0.0,
                                                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                "up_proj", "down_proj"], task_type="CAUSAL_LM"))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01, fused=torch.device(args.device).type == "cuda")
    peft_model.train()
    accum = len(convs_per_step) // micro

    def step():
        for b in range(0, len(convs_per_step), micro):
            batch = convs_per_step[b:b + micro]
            T = max(len(ids) for ids, _ in batch)
            ids = torch.zeros(len(batch), T, dtype=torch.long)
            att = torch.zeros(len(batch), T, dtype=torch.long)
            labels = torch.full((len(batch), T), -100)
            for i, (x, m) in enumerate(batch):
                ids[i, :len(x)], att[i, :len(x)] = torch.tensor(x), 1
                labels[i, :len(x)] = torch.where(torch.tensor(m, dtype=torch.bool), torch.tensor(x), -100)
            out = peft_model(input_ids=ids.to(args.device), attention_mask=att.to(args.device), labels=labels.to(args.device))
            (out.loss / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed_steps(step, args.steps, args.device)


def bench_sample(ours, ref, args, vocab):
    from sample import generate
    g = torch.Generator().manual_seed(args.seed + 1)
    prompts = [torch.randint(0, vocab - 1000, (int(torch.randint(30, 90, (1,), generator=g)),), generator=g).tolist()
               for _ in range(args.prompts)]
    n_tok = args.prompts * args.n * args.new_tokens

    def run_ours():
        generate(ours, prompts, n=args.n, max_new_tokens=args.new_tokens, temperature=1.0, seed=args.seed)

    def run_ref():  # left-padded, one row per sample, exactly new_tokens each
        T = max(len(p) for p in prompts)
        rows = [p for p in prompts for _ in range(args.n)]
        ids = torch.zeros(len(rows), T, dtype=torch.long)
        att = torch.zeros(len(rows), T, dtype=torch.long)
        for i, p in enumerate(rows):
            ids[i, T - len(p):], att[i, T - len(p):] = torch.tensor(p), 1
        with torch.no_grad():
            ref.generate(input_ids=ids.to(args.device), attention_mask=att.to(args.device), do_sample=True,
                         temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=args.new_tokens,
                         min_new_tokens=args.new_tokens, pad_token_id=0, eos_token_id=None)
    t_ours = timed_steps(run_ours, 1, args.device)
    t_ref = timed_steps(run_ref, 1, args.device)
    return n_tok / t_ours, n_tok / t_ref


def machine(device):
    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} CPU, {os.cpu_count()} cores"


def main(argv=None):
    args = get_args(argv)
    dtype = resolve_dtype(args.dtype, args.device)
    skip = set(filter(None, args.skip.split(",")))
    torch.set_grad_enabled(True)
    if args.model:
        ours, ref = loaded_models(args.model, args.device, dtype)
    else:
        ours, ref = random_models(args.shape, args.device, dtype, args.seed)
    vocab = ours.config.vocab_size
    res = {"machine": machine(args.device), "device": args.device, "dtype": str(dtype).replace("torch.", ""),
           "model": args.model or f"random {args.shape}", "torch": torch.__version__}
    if "sample" not in skip:  # before training adds adapters: base models on both sides
        res["sample_tok_s"], res["sample_ref_tok_s"] = bench_sample(ours, ref, args, vocab)
        res["sample_ratio"] = res["sample_tok_s"] / res["sample_ref_tok_s"]
    if "train" not in skip:
        convs = synthetic_conversations(args.convs, vocab, args.seed)
        n_tok = args.steps * sum(len(ids) for ids, _ in convs)
        res["train_tok_s"] = n_tok / bench_train_ours(ours, convs, args)
        res["train_ref_tok_s"] = n_tok / bench_train_ref(ref, convs, args)
        res["train_ratio"] = res["train_tok_s"] / res["train_ref_tok_s"]
    print(f"\n{res['model']} on {res['machine']} ({res['dtype']})")
    print(f"{'':8} {'ours tok/s':>12} {'reference tok/s':>16} {'ratio':>7}")
    for part, ref_name in (("train", "transformers+PEFT"), ("sample", "HF generate")):
        if f"{part}_ratio" in res:
            print(f"{part:8} {res[f'{part}_tok_s']:>12,.0f} {res[f'{part}_ref_tok_s']:>16,.0f} "
                  f"{res[f'{part}_ratio']:>6.2f}x  (vs {ref_name})")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        train.atomic_json(args.json, res)
    return res


if __name__ == "__main__":
    main()

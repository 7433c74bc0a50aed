"""Benchmark ettrl_kernels.entropy_sample against the naive torch sequence (softmax, entropy, multinomial).

    python bench/sampling_kernels.py                      # CPU: torch path; CUDA (if available): Triton kernel
    python bench/sampling_kernels.py --batch 64 --vocab 151936 --logits lm --repeats 7

Reports the median time of several runs, the speed-up over the naive sequence and the achieved bandwidth
(logit bytes read once / time) next to the bandwidth of a plain copy on the same device.
"""
import argparse
import statistics
import time

import torch

import ettrl_kernels  # noqa: E402


def naive(logits, temperature):
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    log_probs = torch.log_softmax(logits.float() / temperature, dim=-1)
    entropy = -(probs * log_probs).sum(-1)
    tokens = torch.multinomial(probs, 1).squeeze(1)
    return tokens, log_probs.gather(1, tokens[:, None]).squeeze(1), entropy


def make_logits(batch, vocab, kind, dtype, device):
    """`randn`: flat N(0, 2^2) logits; `lm`: a flat bulk plus a few strong tokens, like a language model."""
    logits = torch.randn(batch, vocab, device=device) * 2
    if kind == "lm":
        spikes = torch.randint(0, vocab, (batch, 32), device=device)
        logits.scatter_add_(1, spikes, torch.rand(batch, 32, device=device) * 10 + 14)
    return logits.to(dtype)


def median_ms(fn, repeats, sync):
    fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 64, 256])
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 151936])
    parser.add_argument("--logits", choices=["randn", "lm"], nargs="+", default=["randn", "lm"])
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=-1)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    dtype = getattr(torch, args.dtype)
    backend = ettrl_kernels.resolve_backend("entropy_sample", "auto", torch.empty(1, 1, dtype=dtype, device=device),
                                            truncated=args.top_k > 0 or args.top_p < 1)
    print(f"device={device} backend={backend} dtype={args.dtype} T={args.temperature} top_k={args.top_k} "
          f"top_p={args.top_p} threads={torch.get_num_threads()} repeats={args.repeats} (median ms)")
    print(f"{'logits':>6} {'B':>4} {'V':>7} {'naive':>9} {'fused':>9} {'speedup':>7} {'fused GB/s':>10} "
          f"{'copy GB/s':>9}")
    for kind in args.logits:
        for batch in args.batch:
            for vocab in args.vocab:
                logits = make_logits(batch, vocab, kind, dtype, device)
                seq_ids = torch.arange(batch, device=device)
                step = iter(range(1 << 30))

                def fused():
                    return ettrl_kernels.entropy_sample(logits, temperature=args.temperature, top_k=args.top_k,
                                                  top_p=args.top_p, seeds=0, seq_ids=seq_ids,
                                                  positions=next(step))

                naive_ms = median_ms(lambda: naive(logits, args.temperature), args.repeats, sync)
                fused_ms = median_ms(fused, args.repeats, sync)
                copy_ms = median_ms(lambda: logits.clone(), args.repeats, sync)
                gigabytes = logits.numel() * logits.element_size() / 1e9
                print(f"{kind:>6} {batch:>4} {vocab:>7} {naive_ms:>9.2f} {fused_ms:>9.2f} "
                      f"{naive_ms / fused_ms:>6.1f}x {gigabytes / fused_ms * 1e3:>10.1f} "
                      f"{2 * gigabytes / copy_ms * 1e3:>9.1f}")


if __name__ == "__main__":
    main()

import statistics, sys, time, types
sys.path[:0] = ["bench", "src"]
import torch
from saved_activations import kept_bytes
from train_step import build, Variant, cuda_peak_mib
from softprompt import lean_backward

device = sys.argv[1] if len(sys.argv) > 1 else "cuda"
over = {} if device == "cuda" else {"num_hidden_layers": 2, "vocab_size": 4096}
setup = build("cuda-1b-k100", Variant(), device=device, **over)
model = setup.backbone.model
lean = [type(m).__name__ for m in model.modules() if isinstance(m.__dict__.get("forward"), types.MethodType)]
print("lean modules installed:", len(lean), sorted(set(lean)), flush=True)
seen = set()
for m in model.modules():
    name = type(m).__name__
    if name in seen:
        continue
    seen.add(name)
    if name in lean_backward.NORMS or name in lean_backward.GATED_MLPS:
        fwd = lean_backward._norm_forward if name in lean_backward.NORMS else lean_backward._mlp_forward
        w = next(m.parameters())
        width = m.gate_proj.in_features if hasattr(m, "gate_proj") else w.shape[-1]
        probe = torch.randn(2, 3, width).to(w.device, w.dtype)
        m.requires_grad_(False)
        try:
            with torch.enable_grad():
                res = []
                for run in (fwd, type(m).forward):
                    leaf = probe.clone().requires_grad_()
                    out = run(m, leaf)
                    res.append((out, *torch.autograd.grad(out.float().square().sum(), leaf)))
            (a, ag), (b, bg) = res
            print(name, "equal", torch.equal(a, b), "maxdiff", (a.float() - b.float()).abs().max().item(),
                  "grad maxdiff", (ag.float() - bg.float()).abs().max().item(), flush=True)
        except Exception as e:
            print(name, "raised", repr(e), flush=True)
if device == "cuda":
    lean_backward.install(model)
    print("after re-install:", sum(isinstance(m.__dict__.get("forward"), types.MethodType) for m in model.modules()))
for label, ctx in (("lean", lean_backward.disabled), ("own", lean_backward.disabled)):
    pass
mib = 2**20
print("saved MiB lean", kept_bytes(setup, "ours") / mib, flush=True)
with lean_backward.disabled():
    print("saved MiB own", kept_bytes(setup, "ours") / mib, flush=True)
if device == "cuda":
    print("peak lean", cuda_peak_mib(setup.ours_step, 3))
    with lean_backward.disabled():
        print("peak own", cuda_peak_mib(setup.ours_step, 3))
times = {"lean": [], "own": []}
for i in range(25 if device == "cuda" else 3):
    for label in ("lean", "own"):
        torch.cuda.synchronize() if device == "cuda" else None
        t = time.perf_counter()
        if label == "own":
            with lean_backward.disabled():
                setup.ours_step()
        else:
            setup.ours_step()
        torch.cuda.synchronize() if device == "cuda" else None
        if i >= 5 or device != "cuda":
            times[label].append((time.perf_counter() - t) * 1000)
print({k: round(statistics.median(v), 1) for k, v in times.items()}, flush=True)

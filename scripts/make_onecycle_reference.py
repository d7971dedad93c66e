"""Writes tests/fixtures/onecycle_reference.json: PyTorch OneCycleLR lr and beta1 per step.

Needs torch (CPU): `pip install torch==2.13.0`, then `python scripts/make_onecycle_reference.py`.
The test (tests/test_optim.py) compares histo_jax.optim against these numbers without torch.
"""

import json
import os

import torch

TOTAL = 57


def main():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.Adam([p], lr=3e-4, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-4, total_steps=TOTAL)
    lrs, b1s, params = [], [], []
    g = torch.linspace(-1.0, 2.0, 3)
    for _ in range(TOTAL):
        lrs.append(opt.param_groups[0]["lr"])
        b1s.append(opt.param_groups[0]["betas"][0])
        p.grad = g.clone() * (1 + len(lrs) % 3)
        opt.step()
        sched.step()
        params.append(p.detach().tolist())
    out = {"total_steps": TOTAL, "max_lr": 3e-4, "lr": lrs, "beta1": b1s, "params": params,
           "grad": g.tolist()}
    path = os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "onecycle_reference.json")
    with open(path, "w") as f:
        json.dump(out, f)
    print("wrote", path)


if __name__ == "__main__":
    main()

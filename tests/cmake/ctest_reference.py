"""ctest: torch.ops.load_library on the CMake-built library, then every op against
fastadv.ops.reference (fp32 within 1e-6, fp16/bf16 within one ulp)."""
import json
import sys

import torch

from fastadv.ops import reference as ref


def main(path: str) -> int:
    torch.ops.load_library(path)
    E = torch.ops.fastadv_ext
    print("build_info:", json.loads(E.build_info()))
    gen = torch.Generator().manual_seed(0)
    passed = failed = 0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for shape in ((1, 3, 5, 7), (5, 3, 17, 13), (2, 1000)):
            x_nat = torch.rand(shape, generator=gen).to(dtype)
            x_adv = (x_nat.float() + 0.05 * torch.randn(shape, generator=gen)).clamp(0, 1).to(dtype)
            grad = torch.randn(shape, generator=gen).to(dtype)
            eps_t = torch.rand(shape[0], generator=gen) * 0.3
            cases = [
                ("linf_step", lambda o: E.linf_step(o, x_adv, x_nat, grad, None, 0.02, eps_t, 0.0, 0.0, 1.0),
                 ref.linf_step(x_adv, x_nat, grad, 0.02, eps_t)),
                ("l2_step", lambda o: E.l2_step(o, x_adv, x_nat, grad, None, 0.2, None, 0.5, 0.0, 1.0),
                 ref.l2_step(x_adv, x_nat, grad, 0.2, 0.5)),
                ("linf_project", lambda o: E.linf_project(o, x_adv, x_nat, None, 0.03, 0.0, 1.0),
                 ref.linf_project(x_adv, x_nat, 0.03)),
                ("l2_project", lambda o: E.l2_project(o, x_adv, x_nat, eps_t, 0.0, 0.0, 1.0),
                 ref.l2_project(x_adv, x_nat, eps_t)),
            ]
            for name, run, expect in cases:
                out = torch.empty_like(x_adv)
                run(out)
                tol = 1e-6 if dtype == torch.float32 else torch.finfo(dtype).eps
                err = (out.float() - expect.float()).abs()
                ok = bool((err <= tol * expect.float().abs().clamp_min(1.0)).all())
                passed += ok
                failed += not ok
                if not ok:
                    print(f"FAIL {name} {dtype} {shape}: max error {err.max().item():.3g}")
    print(f"{passed} passed, {failed} failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))

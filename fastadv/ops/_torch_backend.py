"""The reference backend: fastadv.ops.reference run through the backend interface."""
from __future__ import annotations

import torch

from . import reference as ref


class TorchBackend:
    name = "torch"

    def status(self):
        return True

    def supports(self, device: torch.device):
        return True

    def linf_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper):
        out.copy_(ref.linf_step(x_adv, x_nat, grad, alpha, eps, lower, upper))

    def l2_step(self, out, x_adv, x_nat, grad, alpha, eps, lower, upper):
        out.copy_(ref.l2_step(x_adv, x_nat, grad, alpha, eps, lower, upper))

    def linf_project(self, out, x, x_nat, eps, lower, upper):
        out.copy_(ref.linf_project(x, x_nat, eps, lower, upper))

    def l2_project(self, out, x, x_nat, eps, lower, upper):
        out.copy_(ref.l2_project(x, x_nat, eps, lower, upper))


backend = TorchBackend()

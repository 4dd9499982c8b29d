"""The official optimisation recipe: parameter groups, SGD/AdamW and Lookahead.

Learning rates and weight decay follow the official rules (their effect, not their code):
parameters whose name contains ``cnn`` get ``OPTIM.CNN_LR``, every other parameter ``OPTIM.LR``;
a ViT backbone (``visual.vit.*``, not in the official code) counts as the ``cnn`` group, so
``OPTIM.CNN_LR`` is the visual backbone's learning rate whatever its kind;
weight decay is ``OPTIM.WEIGHT_DECAY`` except for names that ``re.match`` the ``OPTIM.NO_DECAY``
regex. The official code builds one parameter group per tensor; here tensors with the same
learning rate and decay share a group, which gives the same update with a handful of vectorised
(``foreach``) kernel launches instead of hundreds of small ones. Official optimizer state dicts
(one group per tensor) still load, see :meth:`Lookahead.load_state_dict`.
"""
from __future__ import annotations

import re
from typing import Any

import torch
from fvcore.common.config import CfgNode
from torch import nn


def build_param_groups(cfg: CfgNode, model: nn.Module) -> list[dict[str, Any]]:
    """Parameter groups ``cnn``, ``cnn_no_decay``, ``textual``, ``textual_no_decay`` (those
    that have members, in first-appearance order); ``name`` labels the group in logs.

    Each group also records ``model_index``, the position of each tensor in
    ``model.named_parameters()`` (shared tensors counted once), which maps an official state dict
    (one group per tensor, in that order) onto these groups.
    """
    no_decay = re.compile(cfg.OPTIM.NO_DECAY)
    groups: dict[tuple[float, float], dict[str, Any]] = {}
    for index, (name, param) in enumerate(model.named_parameters()):
        if not param.requires_grad:
            continue
        is_cnn = "cnn" in name or name.startswith("visual.vit.")
        decays = not no_decay.match(name)
        lr = cfg.OPTIM.CNN_LR if is_cnn else cfg.OPTIM.LR
        weight_decay = cfg.OPTIM.WEIGHT_DECAY if decays else 0.0
        group = groups.setdefault(
            (is_cnn, decays),
            {
                "name": ("cnn" if is_cnn else "textual") + ("" if decays else "_no_decay"),
                "params": [],
                "model_index": [],
                "lr": lr,
                "weight_decay": weight_decay,
            },
        )
        group["params"].append(param)
        group["model_index"].append(index)
    return list(groups.values())


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer | Lookahead:
    """SGD (momentum, no Nesterov) or AdamW over :func:`build_param_groups`, wrapped in
    :class:`Lookahead` when ``OPTIM.LOOKAHEAD.USE``.

    The update is the fused (single-kernel) implementation on accelerators and on CPU, which is
    numerically the same update as the per-tensor loop but much faster.
    """
    groups = build_param_groups(cfg, model)
    name = cfg.OPTIM.OPTIMIZER_NAME
    if name == "sgd":
        inner = torch.optim.SGD(groups, lr=cfg.OPTIM.LR, momentum=cfg.OPTIM.SGD_MOMENTUM, fused=True)
    elif name == "adamw":
        inner = torch.optim.AdamW(groups, lr=cfg.OPTIM.LR, fused=True)
    else:
        raise ValueError(f"OPTIM.OPTIMIZER_NAME: unknown optimizer '{name}' (expected sgd or adamw)")
    if not cfg.OPTIM.LOOKAHEAD.USE:
        return inner
    return Lookahead(inner, alpha=cfg.OPTIM.LOOKAHEAD.ALPHA, k=cfg.OPTIM.LOOKAHEAD.STEPS)


def inner_optimizer(optimizer: torch.optim.Optimizer | Lookahead) -> torch.optim.Optimizer:
    """The ``torch.optim`` optimizer that owns the parameter groups (what an LR scheduler drives)."""
    return optimizer.inner if isinstance(optimizer, Lookahead) else optimizer


class Lookahead:
    """Lookahead (Zhang et al. 2019) around any ``torch.optim`` optimizer.

    Keeps a slow copy of the parameters; after every ``k`` inner steps the fast weights move to
    ``slow + alpha * (fast - slow)`` and the slow weights take that value.

    Unlike the official implementation, :meth:`state_dict` includes the slow weights and the step
    counter, so a resumed run continues exactly where it stopped; the official implementation
    re-copies the slow weights from the current weights on load, which changes the trajectory.
    """

    def __init__(self, inner: torch.optim.Optimizer, alpha: float = 0.5, k: int = 5):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Lookahead alpha must be in [0, 1], got {alpha}")
        if k < 1:
            raise ValueError(f"Lookahead k must be >= 1, got {k}")
        self.inner = inner
        self.alpha = alpha
        self.k = k
        self.step_count = 0
        self.slow = [p.detach().clone() for p in self._params()]

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.inner.param_groups

    @property
    def state(self) -> Any:
        return self.inner.state

    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.inner.param_groups for p in group["params"]]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    @torch.no_grad()
    def step(self) -> None:
        self.inner.step()
        self.step_count += 1
        if self.step_count % self.k == 0:
            fast = self._params()
            torch._foreach_lerp_(self.slow, fast, self.alpha)
            torch._foreach_copy_(fast, self.slow)

    def state_dict(self) -> dict[str, Any]:
        """References to the live state, like ``torch.optim.Optimizer.state_dict``: a copy of the
        slow weights would add their full size (0.68 GiB for H2048) to peak memory at every
        checkpoint. Save or copy it before the next :meth:`step`."""
        return {
            "inner": self.inner.state_dict(),
            "slow": list(self.slow),
            "step_count": self.step_count,
            "alpha": self.alpha,
            "k": self.k,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict from :meth:`state_dict`, or an official VirTex ``optimizer`` entry.

        An official entry is the inner optimizer's state alone, with one group per tensor in
        ``named_parameters`` order; its per-tensor state is mapped onto these groups by name, and
        the slow weights restart from the current weights (as the official code does). Alpha and
        k stay this optimizer's, the config's, as the other hyper-parameters do on ``--resume``.
        """
        if "inner" not in state_dict:
            self.inner.load_state_dict(regroup_official_state(state_dict, self.inner))
            with torch.no_grad():
                torch._foreach_copy_(self.slow, self._params())
            self.step_count = 0
            return
        self.inner.load_state_dict(state_dict["inner"])  # alpha and k stay this optimizer's (the config's)
        with torch.no_grad():
            torch._foreach_copy_(self.slow, [s.to(p.device) for s, p in zip(state_dict["slow"], self.slow)])
        self.step_count = int(state_dict["step_count"])


def regroup_official_state(official: dict[str, Any], optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Turn an official one-group-per-tensor optimizer state dict into one for ``optimizer``.

    The official groups follow ``model.named_parameters()``, the order recorded in each group's
    ``model_index`` by :func:`build_param_groups`. Hyper-parameters come from ``optimizer`` (the
    config), per-tensor state (momentum buffers) from the official dict.
    """
    ours = optimizer.state_dict()
    model_order = sorted(
        (index, our_id)
        for group, our_group in zip(optimizer.param_groups, ours["param_groups"])
        for index, our_id in zip(group["model_index"], our_group["params"])
    )
    official_groups = official["param_groups"]
    if len(official_groups) != len(model_order) or any(len(g["params"]) != 1 for g in official_groups):
        raise ValueError(
            f"official optimizer state has {len(official_groups)} groups; expected one group per "
            f"parameter ({len(model_order)} parameters)"
        )
    state = {}
    for (_, our_id), official_group in zip(model_order, official_groups):
        entry = official["state"].get(official_group["params"][0])
        if entry is not None:
            state[our_id] = entry
    return {"state": state, "param_groups": ours["param_groups"]}

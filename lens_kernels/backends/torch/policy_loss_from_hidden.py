"""policy_loss_from_hidden on the torch backend. mode="fast": the gradient in forward, 3 GEMMs, no
logits recompute; otherwise the lean path (``linear_token_logprobs`` then ``policy_loss``)."""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from ...config import LossConfig
from ._common import compute_dtype, flat_keep, per_token, rows_backward, rows_per_chunk, rows_stats, slice_tau, tau_rows
from .linear_token_logprobs import linear_token_logprobs
from .policy_loss import METRIC_NAMES, aggregation_weights, kl_and_grad, policy_loss, token_coefficients


def policy_loss_from_hidden(hidden, weight, targets, mask, advantages, bias=None, old_logps=None,
                            ref_logps=None, is_weights=None, temperature=1.0,
                            config: LossConfig = LossConfig(), num_tokens=None, num_sequences=None,
                            grad_scale=1.0, mode="fast"):
    """mode="fast" with token-level ratios computes the gradient in forward (3 GEMMs, see
    ``FastHiddenLossFunction``). Sequence-level ratios (GSPO) need every token of a sequence before any
    token's gradient is known, so they take the lean path (forward, a per-sequence reduction, then
    backward recomputing the logits), as does a call that needs no gradient at all."""
    if mode == "fast" and fast_mode_applies(config, hidden, weight, bias):
        rows = rows_per_chunk(weight.shape[0], 2 * (torch.finfo(compute_dtype(hidden.dtype)).bits // 8)
                              + hidden.element_size())
        return fast_policy_loss_from_hidden(
            hidden, weight, targets, mask, advantages, bias, old_logps, ref_logps, is_weights, temperature,
            config, num_tokens, num_sequences, grad_scale, chunk_step=torch_chunk_step, rows=rows)
    logps, entropy = linear_token_logprobs(hidden, weight, targets, bias, mask, temperature, True)
    return policy_loss(logps, advantages, mask, old_logps, ref_logps, entropy, is_weights, config,
                       num_tokens, num_sequences)


def fast_mode_applies(cfg: LossConfig, hidden, weight, bias) -> bool:
    """Token-level ratios, and a gradient wanted (else the 2 gradient GEMMs would be wasted)."""
    wants_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias))
    return cfg.ratio_level == "token" and wants_grad


def token_loss_grads(l, entropy, keep, A, l_old, l_ref, is_weights, w, w_h, cfg: LossConfig):
    """(dL/dl, dL/dH) of each token for token-level ratios: both depend on the token's own values only,
    given its aggregation weights w (loss) and w_h (entropy bonus) over the whole micro-batch. Every
    argument has one shape (a chunk of tokens as [1, r]); masked tokens get exactly 0. dL/dH is None
    without an entropy bonus."""
    zero = torch.zeros((), dtype=l.dtype, device=l.device)
    l = torch.where(keep, l, zero)
    l_old = l if l_old is None else torch.where(keep, l_old, zero)  # garbage under the mask must not NaN
    _, df, direct, _, drho = token_coefficients(l, l_old, A, keep.to(l.dtype), cfg, is_weights)
    g_l = w * df * drho
    if direct is not None:
        g_l = g_l + w * direct
    if cfg.beta != 0.0:
        _, dkl = kl_and_grad(l, torch.where(keep, l_ref, zero), cfg)
        g_l = g_l + cfg.beta * w * dkl
    g_h = None if cfg.entropy_coef == 0.0 else -cfg.entropy_coef * w_h
    return g_l, g_h


def torch_chunk_step(z, targets, tau, coef_fn):
    """The per-row step of the fast mode on one chunk of logits z [r, V] (owned, may be overwritten):
    log-probs and entropy, then the coefficients ``coef_fn(logp, entropy) -> (g_l, g_h)``, then dL/dz
    written over the chunk buffer. Returns (dL/dz, logp, entropy). The Triton backend passes its own."""
    y = z.to(compute_dtype(z.dtype))
    del z  # the GEMM output, when y is an upcast copy
    logp, _, log_l, entropy = rows_stats(y, targets, tau)  # y = z / tau - m_i
    g_l, g_h = coef_fn(logp, entropy)
    rows_backward(y, targets, 1.0, log_l, entropy, g_l, g_h)  # (y - log_l) is log p: no tau here
    if torch.is_tensor(tau) or tau != 1.0:
        y.div_(tau)
    return y, logp, entropy


def accumulate_t_mm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a^T @ b, with the products of bf16/fp16 operands accumulated in acc's dtype (fp32)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a.t(), b)
        return
    if acc.device.type == "cuda":
        try:  # cuBLAS with an fp32 output: no rounding of the chunk's partial sum to bf16
            acc.add_(torch.mm(a.t(), b, out_dtype=acc.dtype))
            return
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=)
            pass
    acc.addmm_(a.t().to(acc.dtype), b.to(acc.dtype))


_grad_scale_warned = False


def upstream_correction(grad_output: torch.Tensor, grad_scale: float):
    """grad_output / grad_scale for a gradient computed in forward for upstream ``grad_scale``
    (SPEC 5, grad-scale contract), or None when nothing is to be done. On CPU the check is free: a
    factor != 1 warns once. On a GPU it would sync, so the factor is always applied (exact when it is
    1: one elementwise pass over the gradients) and no warning is given."""
    global _grad_scale_warned
    ratio = grad_output.detach() / grad_scale
    if grad_output.device.type != "cpu":
        return ratio
    if bool(ratio == 1.0):
        return None
    if not _grad_scale_warned:
        _grad_scale_warned = True
        warnings.warn(f"lens_kernels: backward got grad_output {float(grad_output)} != grad_scale {grad_scale}; "
                      "the gradient computed in forward is rescaled (pass grad_scale= to avoid the extra pass)")
    return ratio


class FastHiddenLossFunction(torch.autograd.Function):
    """Forward: per row chunk, logits = h W^T + b (GEMM 1), the per-row step (log-probs, entropy, the
    per-token loss coefficients, dL/dz over the chunk buffer), dX = dz W (GEMM 2) and dW += dz^T h
    (GEMM 3, fp32 accumulator). Backward only scales the stored gradients by grad_output / grad_scale.
    A frozen weight skips GEMM 3. Token-level ratios only."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights,
                temperature, cfg, num_tokens, num_sequences, grad_scale, chunk_step, rows):
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        B, T = targets.shape
        vocab, width = weight.shape
        h = hidden.reshape(-1, width)
        n = h.shape[0]
        cdt = compute_dtype(hidden.dtype)
        acc = torch.float64 if weight.dtype == torch.float64 else torch.float32
        t, keep = flat_keep(targets, mask)
        mask_f = mask.to(cdt)
        agg = dict(num_tokens=num_tokens, num_sequences=num_sequences, norm_length=cfg.loss_norm_length,
                   dp_size=cfg.dp_size)
        w = aggregation_weights(mask_f, cfg.loss_agg_mode, **agg)
        w_h = w if cfg.entropy_agg_mode in (None, cfg.loss_agg_mode) else aggregation_weights(
            mask_f, cfg.entropy_agg_mode, **agg)
        # grad_scale folds into the weights: every coefficient is linear in them
        w, w_h = (w * grad_scale).reshape(-1), (w_h * grad_scale).reshape(-1)
        A = per_token(advantages, (B, T), cdt)
        l_old = None if old_logps is None else old_logps.reshape(-1).to(cdt)
        l_ref = None if ref_logps is None else ref_logps.reshape(-1).to(cdt)
        is_w = None if is_weights is None else per_token(is_weights, (B, T), cdt)
        tau = tau_rows(temperature, targets.shape, mask_f)

        logp = torch.empty(n, dtype=cdt, device=h.device)
        entropy = torch.empty_like(logp)
        d_hidden = torch.empty_like(h) if need_h else None
        d_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if need_w else None
        d_bias = torch.zeros(vocab, dtype=acc, device=h.device) if (need_b and bias is not None) else None
        for start in range(0, n, rows):
            stop = min(n, start + rows)
            row = lambda x: None if x is None else x[start:stop].view(1, -1)  # noqa: E731
            keep_c = torch.ones(1, stop - start, dtype=torch.bool, device=h.device) if keep is None else row(keep)

            def coef_fn(logp_c, entropy_c):
                g_l, g_h = token_loss_grads(logp_c.view(1, -1), entropy_c.view(1, -1), keep_c, row(A), row(l_old),
                                            row(l_ref), row(is_w), row(w), row(w_h), cfg)
                return g_l.view(-1), None if g_h is None else g_h.view(-1)

            hs = h[start:stop]
            dz, logp[start:stop], entropy[start:stop] = chunk_step(
                F.linear(hs, weight, bias), t[start:stop], slice_tau(tau, start, stop), coef_fn)
            dz_in = dz.to(h.dtype)
            if need_h:
                torch.matmul(dz_in, weight, out=d_hidden[start:stop])
            if need_w:
                accumulate_t_mm(d_weight, dz_in, hs)
            if d_bias is not None:
                d_bias.add_(dz.sum(0, dtype=acc))
            del dz, dz_in  # free this chunk's buffers before the next GEMM allocates
        if keep is not None:
            zero = torch.zeros((), dtype=cdt, device=h.device)
            logp = torch.where(keep, logp, zero)
            entropy = torch.where(keep, entropy, zero)
        # the loss value and metrics from the same per-token values, by the same code as policy_loss
        loss, named = policy_loss(logp.view(B, T), advantages, mask, old_logps, ref_logps, entropy.view(B, T),
                                  is_weights, cfg, num_tokens, num_sequences)
        metrics = torch.stack([named[name] for name in METRIC_NAMES])
        ctx.grads = (None if d_hidden is None else d_hidden.view(hidden.shape),
                     None if d_weight is None else d_weight.to(weight.dtype),
                     None if d_bias is None else d_bias.to(bias.dtype))
        del d_weight  # the fp32 accumulator, before the caller's backward allocates anything
        ctx.grad_scale = grad_scale
        ctx.mark_non_differentiable(metrics)
        return loss, metrics

    @staticmethod
    def backward(ctx, grad_loss, _grad_metrics):
        if ctx.grads is None:
            raise RuntimeError("policy_loss_from_hidden(mode='fast') stores its gradient once: backward can run "
                               "only once (use mode='lean' to backward twice through the graph)")
        grads, ctx.grads = ctx.grads, None
        ratio = upstream_correction(grad_loss, ctx.grad_scale)
        if ratio is not None:
            for g in grads:
                if g is not None:
                    g.mul_(ratio)
        return grads + (None,) * 13


def fast_policy_loss_from_hidden(hidden, weight, targets, mask, advantages, bias, old_logps, ref_logps,
                                 is_weights, temperature, config, num_tokens, num_sequences, grad_scale,
                                 chunk_step, rows):
    """``FastHiddenLossFunction`` with the per-row step ``chunk_step`` (see ``torch_chunk_step``) on
    chunks of ``rows`` rows. Returns (loss, metrics) as ``policy_loss``."""
    loss, metrics = FastHiddenLossFunction.apply(
        hidden, weight, bias, targets, mask, advantages, old_logps, ref_logps, is_weights, temperature, config,
        num_tokens, num_sequences, float(grad_scale), chunk_step, rows)
    return loss, dict(zip(METRIC_NAMES, metrics.unbind(0)))

# Licensed under a 3-clause BSD style license - see LICENSE
"""
Fast CPU inference of `~cubesfh.network._model.SFHNet` (issue 12).

`FastSFHNet` evaluates exactly the same function as ``SFHNet.encode`` +
``decode`` (+ ``heads``) with the weights of an existing module, rearranged
once at construction, and plain torch operators:

* **Channels-last convolutions.** The first convolution (one input channel,
  or two with the validity channel of the 0.4 networks) is a matrix product
  on the unfolded spectrum; the other two run as
  ``conv2d`` on ``(batch, channels, 1, length)`` tensors in the
  ``channels_last`` memory format (oneDNN's fast layout on CPU, about three
  times faster than ``conv1d`` in the default layout for these channel counts);
  the ``(batch, length, channels)`` result of the last stage is what the
  attention layer reads, so no transposition is copied.
* **Instance normalisation + PReLU + max-pooling** in one short sequence of
  operators on the pooled (half-size) tensor: the per-sample, per-channel
  statistics are taken on the convolution output, and because the
  normalisation is an increasing affine map (all ``gamma`` > 0, checked) and
  ``PReLU(y) = max(y, alpha y)`` for ``alpha <= 1`` (``min(y, alpha y)`` for
  ``alpha > 1``), the max-pool commutes with them: ``pool(PReLU(a y + b)) =
  max(a Y+ + b, alpha (a Y + b))`` (``min`` for ``alpha > 1``) with ``Y+``
  the pair maximum and ``Y`` the pair maximum (``alpha >= 0``) or minimum
  (``alpha < 0``). The selected values are the same ones, so
  only the rounding of the statistics differs from the module (1e-7).
  (InstanceNorm uses per-sample statistics, so unlike BatchNorm it cannot be
  folded into the convolution weights.)
* **Attention** through ``scaled_dot_product_attention`` on the packed
  projection, with the learned positional embedding added once.
* **Heads** computed in the same pass; the reconstruction residual of the
  out-of-distribution score is a matrix-vector product with the squared
  pixel scatter on the continuum pixels (no copy of the reconstruction),
  over the valid pixels only when a spectrum has gaps.

Everything is float32 and runs under `torch.inference_mode`. If a module
does not satisfy the conditions above (e.g. a retrained network with a
negative ``gamma``), `FastSFHNet.supports` is false and the caller uses the
module itself.
"""

import numpy as np
import torch
import torch.nn.functional as F

from ..conventions import N_AGE_BINS

__all__ = ["FastSFHNet"]


def _prelu_weight(module):
    return module.weight.detach().float().contiguous()


def _dense(seq):
    """(weight, bias, prelu alpha or None) triplets of an alternating Linear/PReLU stack."""
    layers = [m for m in seq if not isinstance(m, torch.nn.Flatten)]
    out = []
    i = 0
    while i < len(layers):
        lin = layers[i]
        alpha = None
        if i + 1 < len(layers) and isinstance(layers[i + 1], torch.nn.PReLU):
            alpha = _prelu_weight(layers[i + 1])
            if alpha.numel() != 1:
                raise ValueError("dense PReLU with several parameters")
            i += 1
        out.append((lin.weight.detach().float().contiguous(),
                    lin.bias.detach().float().contiguous(), alpha))
        i += 1
    return out


def _run_dense(h, layers):
    for w, b, alpha in layers:
        h = F.linear(h, w, b)
        if alpha is not None:
            h = F.prelu(h, alpha)
    return h


class FastSFHNet:
    """
    Inference-only rearrangement of an `SFHNet` (same outputs to 1e-6).

    Parameters
    ----------
    net : `SFHNet`
        The module (its weights are copied; later changes to it are not seen).
    spec_std : `~numpy.ndarray`, optional
        ``(n_pix,)`` pixel scatter of the input standardisation (for the
        reconstruction residual).
    continuum : `~numpy.ndarray`, optional
        ``(n_pix,)`` bool, the pixels of the reconstruction residual.
    """

    def __init__(self, net, spec_std=None, continuum=None):
        with torch.no_grad():
            self.stages = []
            for st in net.conv:
                conv = st.conv
                gamma = st.norm.weight.detach().float()
                alpha = _prelu_weight(st.act)
                self.stages.append({
                    "w": conv.weight.detach().float().unsqueeze(2).contiguous(
                        memory_format=torch.channels_last),
                    "b": conv.bias.detach().float().contiguous(),
                    "stride": (1, conv.stride[0]), "padding": (0, conv.padding[0]),
                    "im2col": ((conv.kernel_size[0], conv.stride[0], conv.padding[0],
                                conv.in_channels)
                               if conv.in_channels <= 2 and conv.groups == 1
                               and conv.dilation[0] == 1 and conv.padding_mode == "zeros"
                               else None),
                    # (channels x kernel, out): the unfolded columns of every input
                    # channel side by side
                    "w_mat": conv.weight.detach().float().reshape(
                        conv.out_channels, -1).t().contiguous(),
                    "gamma": gamma.contiguous(), "beta": st.norm.bias.detach().float().contiguous(),
                    "eps": float(st.norm.eps),
                    "alpha": alpha, "neg": (alpha < 0), "any_neg": bool((alpha < 0).any()),
                    "big": (alpha > 1), "any_big": bool((alpha > 1).any()),
                    "ok": bool(st.norm.affine and not st.norm.track_running_stats
                               and (gamma > 0).all()
                               and isinstance(st.pool, torch.nn.MaxPool1d)
                               and st.pool.kernel_size == 2 and st.pool.stride == 2
                               and st.pool.padding == 0),
                })
            att = net.attention
            self.heads_n = att.num_heads
            self.embed = att.embed_dim
            self.pos = net.pos.detach().float().contiguous()
            self.in_w = att.in_proj_weight.detach().float().contiguous()
            self.in_b = att.in_proj_bias.detach().float().contiguous()
            self.out_w = att.out_proj.weight.detach().float().contiguous()
            self.out_b = att.out_proj.bias.detach().float().contiguous()
            self.ln = (net.attn_norm.weight.detach().float().contiguous(),
                       net.attn_norm.bias.detach().float().contiguous(),
                       float(net.attn_norm.eps))
            self.spec_dense = _dense(net.spec_dense)
            self.phot_dense = _dense(net.phot_dense)
            self.latent = _dense(net.latent)
            self.decoder = _dense(net.decoder)
            self.zh_offset = float(net.zh_offset)
            self.mask_channel = bool(getattr(net, "mask_channel", False))
            self.uncertainty = bool(getattr(net, "uncertainty", False))
            if self.uncertainty:
                self.sigma_head = _dense(net.sigma_head)
                self.recon_head = _dense(net.recon_head)
                self.latent_mean = net.latent_mean.detach().float().contiguous()
                self.latent_precision = net.latent_precision.detach().float().contiguous()
                if spec_std is not None and continuum is not None:
                    keep = np.asarray(continuum, bool)
                    w2 = np.where(keep, np.asarray(spec_std, np.float64) ** 2, 0.0)
                    self.recon_weight = torch.from_numpy((w2 / keep.sum()).astype(np.float32))
                    self.recon_weight_sum = torch.from_numpy(w2.astype(np.float32))
                    self.recon_count = torch.from_numpy(keep.astype(np.float32))
                else:
                    self.recon_weight = None
        self.supports = (all(s["ok"] for s in self.stages) and att.batch_first
                         and att._qkv_same_embed_dim and att.in_proj_bias is not None
                         and float(att.dropout) == 0.0 and att.bias_k is None)

    # ------------------------------------------------------------------
    def _stage(self, h, st):
        """Conv + InstanceNorm + PReLU + MaxPool(2); ``h`` is (b, c, 1, L) channels-last."""
        if st["im2col"] is not None:
            # one or two input channels: a (b x positions, channels x kernel) @
            # (channels x kernel, out) product on the unfolded spectrum, channels-last
            # from the start (several times faster)
            k, stride, pad, c_in = st["im2col"]
            xs = h.reshape(h.shape[0], c_in, -1)
            cols = F.pad(xs, (pad, pad)).unfold(2, k, stride)  # (b, c_in, L, k)
            b, length = cols.shape[0], cols.shape[2]
            cols = cols.permute(0, 2, 1, 3) if c_in > 1 else cols[:, 0]
            ch = st["b"].numel()
            y = torch.addmm(st["b"], cols.reshape(b * length, c_in * k),
                            st["w_mat"]).view(b, length, ch)
        else:
            c = F.conv2d(h, st["w"], st["b"], stride=st["stride"], padding=st["padding"])
            b, ch, _, length = c.shape
            y = c.permute(0, 2, 3, 1).reshape(b, length, ch)  # a view (channels last)
        # two-pass statistics (torch.var_mean is several times slower on this layout)
        mean = y.mean(dim=1, keepdim=True)
        var = torch.sub(y, mean).square_().mean(dim=1, keepdim=True)
        scale = st["gamma"] * torch.rsqrt(var + st["eps"])
        shift = st["beta"] - mean * scale
        half = length // 2
        even, odd = y[:, 0:2 * half:2], y[:, 1:2 * half:2]
        hi = torch.maximum(even, odd)
        sel = torch.where(st["neg"], torch.minimum(even, odd), hi) if st["any_neg"] else hi
        top = torch.addcmul(shift, hi, scale)
        other = torch.addcmul(shift, sel, scale).mul_(st["alpha"])
        out = torch.maximum(top, other)  # (b, half, ch) contiguous
        if st["any_big"]:
            # a slope above 1 (a retrained network can have one): PReLU(z) = min(z, alpha z)
            out = torch.where(st["big"], torch.minimum(top, other), out)
        return out

    def encode(self, x, photometry, mask, valid=None):
        """Latent vectors of standardised inputs (as `SFHNet.encode`)."""
        b = x.shape[0]
        if self.mask_channel:
            if valid is None:
                valid = torch.ones_like(x)
            h = torch.stack([x * valid, valid], dim=1).reshape(b, 2, 1, x.shape[1])
        elif valid is not None:
            h = (x * valid).reshape(b, 1, 1, x.shape[1])
        else:
            h = x.reshape(b, 1, 1, x.shape[1])
        for st in self.stages:
            y = self._stage(h, st)
            h = y.permute(0, 2, 1).unsqueeze(2)  # (b, c, 1, L) view, channels-last
        h = y + self.pos  # (b, pos, c)
        n_pos, e = h.shape[1], self.embed
        nh = self.heads_n
        qkv = F.linear(h, self.in_w, self.in_b).view(b, n_pos, 3, nh, e // nh)
        qkv = qkv.permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        a = F.linear(a.transpose(1, 2).reshape(b, n_pos, e), self.out_w, self.out_b)
        h = F.layer_norm(h.add_(a), (e,), self.ln[0], self.ln[1], self.ln[2])
        s = _run_dense(h.reshape(b, -1), self.spec_dense)
        p = _run_dense(torch.cat([photometry * mask, mask], dim=1), self.phot_dense)
        return _run_dense(torch.cat([s, p], dim=1), self.latent)

    def decode(self, z):
        """Mass fractions and [Z/H] per age bin (as `SFHNet.decode`)."""
        out = _run_dense(z, self.decoder)
        return torch.softmax(out[:, :N_AGE_BINS], dim=1), out[:, N_AGE_BINS:] + self.zh_offset

    def heads(self, z, x=None, valid=None):
        """
        Log sigma, squared Mahalanobis distance, and (with ``x``) the mean squared
        reconstruction residual on the (valid) continuum pixels in flux units.
        """
        d = z - self.latent_mean
        m2 = ((d @ self.latent_precision) * d).sum(dim=1)
        log_sigma = _run_dense(z, self.sigma_head)
        if x is None:
            return log_sigma, m2, None
        r = _run_dense(z, self.recon_head)
        r = torch.sub(x, r, out=r)
        r = r.mul_(r)
        if valid is None:
            return log_sigma, m2, r @ self.recon_weight
        num = (r * valid) @ self.recon_weight_sum
        return log_sigma, m2, num / (valid @ self.recon_count).clamp_(min=1.0)

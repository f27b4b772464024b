"""Cambrian: several vision encoders combined by a Spatial Vision Aggregator (SVA) before and inside
a Llama / Qwen decoder.

Each encoder reads the image at its own fixed square size and gives a feature grid, resized to
(w_k G) x (w_k G) and projected to a common width C. A G x G grid of learned queries
cross-attends, cell (i, j) to its own w_k x w_k window of every encoder's grid (the keys and
values of all encoders concatenated, each encoder with its own K/V projections and window position
embeddings), each query also reading a global context feature (the mean of the first encoder's
projected features). A few such layers run before the decoder (the aggregator); a projector maps
the grid to the decoder width, and a learned newline embedding ends each row of image tokens.
Optionally more SVA layers run inside the decoder, after chosen decoder layers, with the decoder's
hidden states at the image tokens as queries (the same windows and context).

The batch layout is the shared N x L slot layout (titan_mm/data/image.py MultiEncoderInputSpec):
each image is one visual item of G x (G + 1) rows (G x G without newlines), one per image token,
holding the encoders' images; every slot is encoded, padding included, so every rank issues the
same collectives. Single-device code; parallelism is applied from outside (parallelize.py).
"""

import functools
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from titan_mm.data.batch import BatchShape
from titan_mm.data.image import MultiEncoderInputSpec, SquareImageInput, split_encoder_images
from titan_mm.models.cambrian.encoders import ENCODERS, EncoderArgs, build_encoder
from titan_mm.models.llama.model import Decoder, DecoderArgs
from titan_mm.models.multimodal import image_token_positions, scatter_image_embeddings


@dataclass
class CambrianArgs:
    encoders: tuple[EncoderArgs, ...] = field(default_factory=lambda: (EncoderArgs(),))
    decoder: DecoderArgs = field(default_factory=DecoderArgs)
    query_side: int = 4
    """G: the aggregator's G x G query grid; each image becomes G x G image tokens (plus G
    newlines)."""
    sva_dim: int = 64
    """C: the common width encoders are projected to, and the aggregator's width."""
    sva_heads: int = 4
    """Attention heads of every SVA layer (the official models use 16)."""
    aggregator_layers: int = 1
    """SVA layers before the decoder (the official connector_depth)."""
    decoder_sva_layers: tuple[int, ...] = ()
    """Decoder layers after which an SVA layer runs on the image tokens' hidden states (the
    official start + k x stride: e.g. (0, 3, 6) for 3 layers from 0 with stride 3); () = none."""
    image_newline: bool = True
    """A learned embedding after each row of image tokens (G x (G + 1) tokens an image)."""
    norm_eps: float = 1e-5
    """LayerNorm epsilon of the projections and SVA layers."""
    image_token_id: int = -1
    """Id of the image placeholder token (the model itself reads image_token_index)."""

    @property
    def grid_hw(self) -> tuple[int, int]:
        """Image tokens of one image: G rows of G (+ 1 newline) columns."""
        return self.query_side, self.query_side + int(self.image_newline)

    @property
    def vision_input(self) -> MultiEncoderInputSpec:
        inputs = tuple(SquareImageInput(e.image_size, tuple(e.vision.image_mean), tuple(e.vision.image_std))
                       for e in self.encoders)
        first = inputs[0]
        return MultiEncoderInputSpec(patch_size=1, temporal_patch_size=1, spatial_merge_size=1,
                                     image_mean=first.image_mean, image_std=first.image_std,
                                     encoder_inputs=inputs, grid_hw=self.grid_hw)


class EncoderProjection(nn.Module):
    """One encoder's features to the common width: Linear-GELU-Linear-LayerNorm."""

    def __init__(self, in_dim: int, dim: int, eps: float):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)

    def forward(self, x):
        return self.norm(self.linear_2(F.gelu(self.linear_1(x))))


class SVALayer(nn.Module):
    """One aggregation layer over M query cells. forward(queries [M, q_dim], context [M, C],
    windows: encoder k's [M, w_k^2, C]) -> [M, q_dim]:

        x = proj_in([queries, proj_context(context)])
        x = x + attention(x -> the concatenated windows + their position embeddings)
        out = queries + mlp(norm(x))

    Attention normalises queries, and each encoder's keys and values, with its own LayerNorm
    before its projection (no biases); windows of one feature (w = 1) have no position
    embedding.
    """

    def __init__(self, q_dim: int, dim: int, windows: tuple[int, ...], n_heads: int, eps: float):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"sva_dim={dim} does not divide by sva_heads={n_heads}")
        self.n_heads = n_heads
        self.proj_context = nn.Linear(dim, dim, bias=False)
        self.proj_in = nn.Linear(q_dim + dim, dim, bias=False)
        self.q_norm = nn.LayerNorm(dim, eps=eps)
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in windows)
        self.k_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in windows)
        self.v_norms = nn.ModuleList(nn.LayerNorm(dim, eps=eps) for _ in windows)
        self.v_projs = nn.ModuleList(nn.Linear(dim, dim, bias=False) for _ in windows)
        # keyed by encoder index: windows of one feature (w = 1) have none
        self.pos_embeds = nn.ParameterDict({str(k): nn.Parameter(torch.empty(w * w, dim))
                                            for k, w in enumerate(windows) if w > 1})
        self.o_proj = nn.Linear(dim, dim, bias=False)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.mlp_1 = nn.Linear(dim, dim, bias=False)
        self.mlp_2 = nn.Linear(dim, q_dim, bias=False)

    def forward(self, queries_MQ: torch.Tensor, context_MC: torch.Tensor, *windows_MWC: torch.Tensor):
        x_MC = self.proj_in(torch.cat([queries_MQ, self.proj_context(context_MC)], -1))
        keys, values = [], []
        for k, win_MWC in enumerate(windows_MWC):
            if str(k) in self.pos_embeds:
                win_MWC = win_MWC + self.pos_embeds[str(k)].to(win_MWC.dtype)
            keys.append(self.k_projs[k](self.k_norms[k](win_MWC)))
            values.append(self.v_projs[k](self.v_norms[k](win_MWC)))
        M, C = x_MC.shape
        q = self.q_proj(self.q_norm(x_MC)).view(M, 1, self.n_heads, -1).transpose(1, 2)  # M h 1 d
        k = torch.cat(keys, 1).view(M, -1, self.n_heads, C // self.n_heads).transpose(1, 2)  # M h T d
        v = torch.cat(values, 1).view(M, -1, self.n_heads, C // self.n_heads).transpose(1, 2)
        attn_MC = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(M, C)
        x_MC = self.norm(x_MC + self.o_proj(attn_MC))
        return queries_MQ + self.mlp_2(F.gelu(self.mlp_1(x_MC)))

    @torch.no_grad()
    def init_weights(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_fan_in(module)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for p in self.pos_embeds.values():
            nn.init.normal_(p)  # as the official code draws them


class CambrianVision(nn.Module):
    """Encoders -> per-encoder projections -> windows and context -> aggregator layers ->
    projector (+ newlines). forward(pixel_values [N, L, D], grid_thw, frame_lengths) returns
    (image embeddings [N * L, decoder dim] image-slot major, every encoder's windows
    [I * G^2, w_k^2, C], context [I, C]) for the I = N * L / (tokens per image) images."""

    def __init__(self, args: CambrianArgs):
        super().__init__()
        self.args = args
        self.input_spec = args.vision_input
        C, G, eps = args.sva_dim, args.query_side, args.norm_eps
        windows = tuple(e.window for e in args.encoders)
        self.encoders = nn.ModuleDict({str(k): build_encoder(e) for k, e in enumerate(args.encoders)})
        self.projections = nn.ModuleDict({str(k): EncoderProjection(ENCODERS[e.kind].feature_dim(e.vision), C, eps)
                                          for k, e in enumerate(args.encoders)})
        self.queries = nn.Parameter(torch.empty(G * G, C))
        self.layers = nn.ModuleDict({str(i): SVALayer(C, C, windows, args.sva_heads, eps)
                                     for i in range(args.aggregator_layers)})
        self.projector_1 = nn.Linear(C, args.decoder.dim)
        self.projector_2 = nn.Linear(args.decoder.dim, args.decoder.dim)
        self.image_newline = nn.Parameter(torch.empty(args.decoder.dim)) if args.image_newline else None

    def forward(self, pixel_values_NLD: torch.Tensor, grid_NL3: torch.Tensor | None = None,
                frame_lengths_NF: torch.Tensor | None = None):
        G = self.args.query_side
        windows, context_IC = [], None
        for k, images_I3RR in enumerate(split_encoder_images(pixel_values_NLD, self.input_spec)):
            enc_args = self.args.encoders[k]
            features_IhwC, _ = self.encoders[str(k)](images_I3RR)  # the class token is not read
            side = enc_args.window * G
            if features_IhwC.shape[1] != side:
                features_IhwC = F.interpolate(features_IhwC.permute(0, 3, 1, 2), size=(side, side),
                                              mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
            proj_IhwC = self.projections[str(k)](features_IhwC)
            if k == 0:
                context_IC = proj_IhwC.mean(dim=(1, 2))
            windows.append(cell_windows(proj_IhwC, G))
        I, C = context_IC.shape
        queries_MC = self.queries.repeat(I, 1)
        context_MC = per_cell(context_IC, G * G)
        for layer in self.layers.values():
            queries_MC = layer(queries_MC, context_MC, *windows)
        embeds = self.projector_2(F.gelu(self.projector_1(queries_MC))).view(I, G, G, -1)
        if self.image_newline is not None:
            newline = self.image_newline.to(embeds.dtype).expand(I, G, 1, -1)
            embeds = torch.cat([embeds, newline], dim=2)
        return embeds.reshape(-1, embeds.shape[-1]), windows, context_IC

    @torch.no_grad()
    def init_weights(self):
        for enc in self.encoders.values():
            enc.init_weights()
        for proj in self.projections.values():
            for lin in (proj.linear_1, proj.linear_2):
                init_fan_in(lin)
            nn.init.ones_(proj.norm.weight)
            nn.init.zeros_(proj.norm.bias)
        # what the official code draws: unit-variance features after each projection, queries and
        # newline of the decoder's embedding scale
        nn.init.normal_(self.queries, std=self.args.decoder.dim ** -0.5)
        for layer in self.layers.values():
            layer.init_weights()
        for lin in (self.projector_1, self.projector_2):
            init_fan_in(lin)
        if self.image_newline is not None:
            nn.init.normal_(self.image_newline, std=self.args.decoder.dim ** -0.5)


def init_fan_in(linear: nn.Linear):
    """Weights of std 1 / sqrt(fan_in) (features keep their scale through the layer), zero bias.
    The aggregator's chain of projections with the decoder's 0.02 would shrink the image tokens
    to a few hundredths of the text's: the debug model then learned to ignore its images."""
    nn.init.trunc_normal_(linear.weight, std=linear.in_features ** -0.5)
    if linear.bias is not None:
        nn.init.zeros_(linear.bias)


def cell_windows(grid_IhwC: torch.Tensor, G: int) -> torch.Tensor:
    """[I, wG, wG, C] -> [I * G * G, w * w, C]: each query cell's window, cells row-major."""
    I, side, _, C = grid_IhwC.shape
    w = side // G
    x = grid_IhwC.reshape(I, G, w, G, w, C).permute(0, 1, 3, 2, 4, 5)  # I G G w w C
    return x.reshape(I * G * G, w * w, C)


def per_cell(x_IC: torch.Tensor, cells: int) -> torch.Tensor:
    """[I, C] -> [I * cells, C]: each image's vector for each of its cells."""
    return x_IC[:, None].expand(-1, cells, -1).reshape(-1, x_IC.shape[-1])


class CambrianModel(nn.Module):
    def __init__(self, args: CambrianArgs):
        super().__init__()
        check_cambrian_args(args)
        self.args = args
        self.vision = CambrianVision(args)
        windows = tuple(e.window for e in args.encoders)
        # the j-th runs after decoder layer decoder_sva_layers[j]
        self.decoder_sva = nn.ModuleDict({
            str(j): SVALayer(args.decoder.dim, args.sva_dim, windows, args.sva_heads, args.norm_eps)
            for j in range(len(args.decoder_sva_layers))}) if args.decoder_sva_layers else None
        self.decoder_sva_after = {layer: str(j) for j, layer in enumerate(args.decoder_sva_layers)}
        self.decoder = Decoder(args.decoder)

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, document_ids: torch.Tensor,
                pixel_values: torch.Tensor | None = None, grid_thw: torch.Tensor | None = None,
                image_token_index: torch.Tensor | None = None,
                document_lengths: torch.Tensor | None = None,
                frame_lengths: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids/position_ids/document_ids/image_token_index [B, S]; pixel_values [N, L, D]
        (MultiEncoderInputSpec's layout). Returns the final hidden states [B, S, D].

        A later pipeline stage has no vision part (and no SVA layers: they must sit on the first
        stage): it gets the previous stage's hidden states [B, S, D] in place of input_ids."""
        if self.vision is None:
            return self.decoder(input_ids, position_ids, document_ids, document_lengths=document_lengths)
        h_BSD = self.decoder.tok_embeddings(input_ids)
        embeds_MD, windows, context_IC = self.vision(pixel_values, grid_thw, frame_lengths)
        positions_M = image_token_positions(image_token_index, embeds_MD.shape[0])
        h_BSD = scatter_image_embeddings(h_BSD, embeds_MD, positions_M)
        after_layer = None
        if self.decoder_sva is not None:
            after_layer = functools.partial(self.decoder_sva_step, positions_M=positions_M, windows=windows,
                                            context_IC=context_IC)
        return self.decoder(h_BSD, position_ids, document_ids, document_lengths=document_lengths,
                            after_layer=after_layer)

    def decoder_sva_step(self, layer_id: int, h_BSD: torch.Tensor, *, positions_M: torch.Tensor,
                         windows: list[torch.Tensor], context_IC: torch.Tensor) -> torch.Tensor:
        """After decoder layer ``layer_id``: the SVA layer that follows it (if any) updates the
        hidden states of the image tokens (newlines kept), read and written at positions_M."""
        if layer_id not in self.decoder_sva_after:
            return h_BSD
        B, S, D = h_BSD.shape
        G, cols = self.args.grid_hw
        # padding slots read a zero row past the end and write into it (dropped)
        h_TD = torch.cat([h_BSD.reshape(B * S, D), h_BSD.new_zeros(1, D)])
        tokens_IGcD = h_TD[positions_M].view(-1, G, cols, D)
        cells_MD = tokens_IGcD[:, :, :G].reshape(-1, D)
        out_MD = self.decoder_sva[self.decoder_sva_after[layer_id]](cells_MD, per_cell(context_IC, G * G).to(h_BSD.dtype),
                                                 *(w.to(h_BSD.dtype) for w in windows))
        tokens_IGcD = torch.cat([out_MD.view(-1, G, G, D), tokens_IGcD[:, :, G:]], dim=2)
        return scatter_image_embeddings(h_BSD, tokens_IGcD.reshape(-1, D), positions_M)

    def init_weights(self):
        if self.vision is not None:  # else a later pipeline stage
            self.vision.init_weights()
        if self.decoder_sva is not None:
            for layer in self.decoder_sva.values():
                layer.init_weights()
        self.decoder.init_weights()


def check_cambrian_args(args: CambrianArgs):
    for e in args.encoders:
        if e.kind not in ENCODERS:
            raise ValueError(f"unknown encoder kind {e.kind!r}; available: {sorted(ENCODERS)}")
    layers = list(args.decoder_sva_layers)
    if layers != sorted(set(layers)) or not all(0 <= i < args.decoder.n_layers for i in layers):
        raise ValueError(f"decoder_sva_layers {layers} must be increasing decoder layers "
                         f"(0..{args.decoder.n_layers - 1})")


def training_flops(args: CambrianArgs, shape: BatchShape) -> float:
    """Matmul FLOPs of one training step (3 x forward) over valid tokens and images: the decoder's
    (as LLaVA counts it), every encoder's, the projections', the aggregator's and the in-decoder
    SVA layers'. Padding images (encoded anyway) are not counted."""
    d = args.decoder
    q_dim, kv_dim = d.n_heads * d.head_dim, d.n_kv_heads * d.head_dim
    decoder_linear = d.n_layers * (2 * d.dim * q_dim + 2 * d.dim * kv_dim + 3 * d.dim * d.ffn_hidden_dim)
    decoder_linear += d.dim * d.vocab_size
    images = shape.patches / (args.grid_hw[0] * args.grid_hw[1])
    G2, C = args.query_side ** 2, args.sva_dim
    encoders = 0  # forward FLOPs of one image's encoders
    per_image = 0  # multiply-adds of one image past the encoders
    for e in args.encoders:
        kind = ENCODERS[e.kind]
        encoders += kind.flops_per_image(e.vision, e.image_size)
        per_image += (e.window ** 2 * G2) * (kind.feature_dim(e.vision) * C + C * C)
    kv = sum(e.window ** 2 for e in args.encoders)

    def sva_macs(q: int) -> int:  # one layer, one cell
        return C * C + (q + C) * C + C * C + 2 * kv * C * C + C * C + C * C + C * q + 2 * kv * C

    per_image += G2 * (args.aggregator_layers * sva_macs(C) + C * d.dim + d.dim * d.dim)
    per_image += G2 * len(args.decoder_sva_layers) * sva_macs(d.dim)
    forward = (2 * decoder_linear * shape.tokens + (encoders + 2 * per_image) * images
               + d.n_layers * (2 if d.causal else 4) * q_dim * shape.doc_len_sq_sum)
    return 3.0 * forward



"""Tiny models of the families added after timm's VisionTransformer, built in code: timm ``Eva``
(EVA / EVA-02 / RoPE ViTs) and torchvision's ``VisionTransformer``. 32x32 images, 4x4 patches,
64 patch tokens."""
import torch


def tiny_eva(qkv_std: float | None = 0.25, **overrides):
    """A seeded timm Eva with rotary embeddings and LayerScale; LayerScale and every norm weight
    drawn away from 1, and q/v biases away from 0, so that a dropped one would show; q/k/v weights
    of standard deviation ``qkv_std`` (None: timm's 0.02), large enough by default that attention is
    sharp and the rotary rows change the output."""
    from timm.models.eva import Eva

    torch.manual_seed(0)
    kwargs = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=3, num_classes=7,
                  use_rot_pos_emb=True, init_values=0.3)
    kwargs.update(overrides)
    model = Eva(**kwargs).eval()
    for name, parameter in model.named_parameters():
        if "gamma" in name or ("norm" in name and name.endswith("weight")):
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
        elif name.endswith(("q_bias", "v_bias")):  # zero at init: make the biases count
            torch.nn.init.normal_(parameter, std=0.1)
        elif name.endswith("qkv.weight") and qkv_std is not None:  # sharp attention: the rotary rows matter
            torch.nn.init.normal_(parameter, std=qkv_std)
    if isinstance(model.head, torch.nn.Linear):  # Eva scales its head by 0.001 at init: logits would be ~1e-4
        torch.nn.init.normal_(model.head.weight, std=0.3)
    return model


#: EVA-02's block: SwiGLU MLP with its inner norm (scale_mlp), rotary embeddings, absolute positions
EVA02 = dict(swiglu_mlp=True, scale_mlp=True, mlp_ratio=4 * 2 / 3)


def tiny_torchvision_vit(**overrides):
    """A seeded torchvision VisionTransformer; its zero-initialised head and class token drawn at
    random (a zero head would make every output equal), norm weights away from 1."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    kwargs = dict(image_size=32, patch_size=4, num_layers=4, num_heads=3, hidden_dim=48, mlp_dim=96, num_classes=7)
    kwargs.update(overrides)
    model = VisionTransformer(**kwargs).eval()
    for name, parameter in model.named_parameters():
        if name.endswith("weight") and ("ln" in name):
            torch.nn.init.uniform_(parameter, 0.5, 1.5)
        elif name.startswith("heads") or name == "class_token":
            torch.nn.init.normal_(parameter, std=0.3)
    return model

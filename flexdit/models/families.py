"""The backbone families flexdit runs, in one table: each one's config and model class, and the standard model
names the command line takes (DiT-XL/2, FlexDiT-B/4, PixArt-XL/2, ...)."""
from flexdit.errors import FlexDiTError
from flexdit.models.core import BackboneConfig, FlexDiTCore
from flexdit.models.dit import DiT, DiTConfig, model_config
from flexdit.models.latte import Latte, LatteConfig, latte_config
from flexdit.models.layout import Layout
from flexdit.models.pixart import PixArt, PixArtConfig, pixart_config
from flexdit.schedule import Density

FAMILIES: dict[str, tuple[type[BackboneConfig], type[FlexDiTCore]]] = {
    DiT.FAMILY: (DiTConfig, DiT),
    PixArt.FAMILY: (PixArtConfig, PixArt),
    Latte.FAMILY: (LatteConfig, Latte),
}
DEFAULT_FRAMES = 16  # Latte's released models
PIXART_NAMES = ("PixArt-XL/2", "FlexDiT-PixArt-XL/2")


def family_of(config: BackboneConfig) -> str:
    return next(name for name, (config_class, _) in FAMILIES.items() if isinstance(config, config_class))


def build_model(config: BackboneConfig) -> FlexDiTCore:
    """A randomly initialised model of the config's family."""
    return FAMILIES[family_of(config)][1](config)


def config_from_dict(d: dict, family: str = DiT.FAMILY) -> BackboneConfig:
    """A config saved by `model.save` (`config.to_dict()`) back into its family's config class."""
    if family not in FAMILIES:
        raise FlexDiTError(f"unknown model family {family!r} (known: {', '.join(FAMILIES)}); the file was written "
                           "by a newer flexdit?")
    return FAMILIES[family][0].from_dict(d)


def named_config(name: str, image_size: int = 256, layout: str | Layout | None = None,
                 density: Density | None = None, frames: int | None = None) -> BackboneConfig:
    """The config of a standard model name at an image size in pixels (latent = image_size / 8), and for video
    models a number of frames (default 16). FlexDiT-* names, and any name given a density, take the default FlexDiT
    layout of their depth unless `layout` says otherwise."""
    if name.removeprefix("FlexDiT-").startswith("Latte"):
        return latte_config(name, frames or DEFAULT_FRAMES, image_size, layout, density)
    if frames is not None:
        raise FlexDiTError(f"--frames applies to video models (Latte-*), not to {name}")
    if name in PIXART_NAMES:
        if layout is None and name.startswith("FlexDiT-"):
            layout = "default"
        return pixart_config(image_size, layout, density)
    if name.startswith("PixArt"):
        raise FlexDiTError(f"unknown model {name!r}; PixArt-alpha comes in one size: {' or '.join(PIXART_NAMES)}")
    return model_config(name, image_size // 8, layout=layout, density=density)

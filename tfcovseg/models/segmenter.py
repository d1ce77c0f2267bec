"""The coarse-refine segmentation network of Huang et al. (2021) and its Table 7 ladder."""

from __future__ import annotations

import keras
from keras import layers

from tfcovseg.constants import LESION_CLASSES
from tfcovseg.models.aspp import apply_aspp
from tfcovseg.models.coarse import apply_coarse_decoder
from tfcovseg.models.encoder import SEResNetEncoder
from tfcovseg.models.layers import from_config_keeping_trainable
from tfcovseg.models.preprocessing import DEFAULT_WINDOW, HUWindow
from tfcovseg.models.refine import apply_refinement


@keras.saving.register_keras_serializable(package="tfcovseg")
class CoarseRefineNet(keras.Model):
    """SE-ResNet-34 U-Net with an ASPP bridge and a residual refinement module.

    Input: "hu", float32 [N, H, W, 1] Hounsfield units (or 0-255 pixels when
    `pre_windowed`). Output: a dict of float32 sigmoid probabilities [N, H, W, C]:
    "coarse" (the U-Net's map) and "final" (sigmoid(coarse logits + refinement residual)).
    Without the refinement module (the lower rungs of the paper's Table 7 ablation) only
    "final" is returned, the U-Net's map.

    The config holds the architecture, not the dtype policy: a model saved under mixed
    precision loads under the global policy in force when it is loaded.

    Attributes:
        encoder: The `SEResNetEncoder` (shared with `build_classifier`).
        window_layer: The `HUWindow` preprocessing layer.

    Args:
        input_size: (H, W), multiples of 32.
        class_names: One output channel per name, in this order.
        hu_window: (low, high) HU window mapped to [0, 1].
        pre_windowed: Inputs are already windowed 8-bit images; only rescaled.
        stem_filters, encoder_filters, encoder_blocks, se_reduction: The encoder.
        use_aspp: ASPP bridge between encoder and decoder (else the stage-4 features
            feed the decoder directly).
        aspp_rates, aspp_filters: The ASPP bridges (coarse network and refinement).
        decoder_filters, decoder_convs: The coarse decoder.
        use_refinement: Add the residual refinement module.
        refine_filters: Filters of the refinement module.
    """

    def __init__(
        self,
        input_size=(512, 512),
        class_names=LESION_CLASSES,
        hu_window=DEFAULT_WINDOW,
        pre_windowed=False,
        stem_filters=64,
        encoder_filters=(64, 128, 256, 512),
        encoder_blocks=(3, 4, 6, 3),
        se_reduction=16,
        use_aspp=True,
        aspp_rates=(3, 6, 9),
        aspp_filters=64,
        decoder_filters=(256, 128, 64, 64),
        decoder_convs=3,
        use_refinement=True,
        refine_filters=64,
        **kwargs,
    ):
        input_size = tuple(int(s) for s in input_size)
        if len(input_size) != 2 or any(s <= 0 or s % 32 for s in input_size):
            raise ValueError(
                f"input_size must be two positive multiples of 32, got {list(input_size)}"
            )
        class_names = tuple(class_names)
        inputs = keras.Input((*input_size, 1), name="hu")
        window_layer = HUWindow(hu_window, pre_windowed, name="window")
        encoder = SEResNetEncoder(
            input_size=input_size,
            input_channels=1,
            stem_filters=stem_filters,
            stage_filters=encoder_filters,
            stage_blocks=encoder_blocks,
            se_reduction=se_reduction,
            name="encoder",
        )
        features = encoder(window_layer(inputs))
        bridge = features["stage4"]
        if use_aspp:
            bridge = apply_aspp(bridge, aspp_filters, aspp_rates, name="aspp")
        skips = [features["stage3"], features["stage2"], features["stage1"], features["stem"]]
        coarse_logits = apply_coarse_decoder(
            bridge, skips, decoder_filters, decoder_convs, len(class_names), name="decoder"
        )
        # Probabilities leave the network in float32 even under a mixed-precision policy.
        if use_refinement:
            residual = apply_refinement(
                coarse_logits, refine_filters, 4, aspp_rates, aspp_filters, name="refine"
            )
            final_logits = layers.Add(name="refined_logits")([coarse_logits, residual])
            outputs = {
                "coarse": layers.Activation("sigmoid", dtype="float32", name="coarse")(
                    coarse_logits
                ),
                "final": layers.Activation("sigmoid", dtype="float32", name="final")(final_logits),
            }
        else:
            outputs = {
                "final": layers.Activation("sigmoid", dtype="float32", name="final")(coarse_logits)
            }
        kwargs.setdefault("name", "coarse_refine_net")
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.encoder = encoder
        self.window_layer = window_layer
        self.input_size = input_size
        self.class_names = class_names
        self.hu_window = tuple(float(w) for w in hu_window)
        self.pre_windowed = bool(pre_windowed)
        self.stem_filters = int(stem_filters)
        self.encoder_filters = tuple(int(f) for f in encoder_filters)
        self.encoder_blocks = tuple(int(b) for b in encoder_blocks)
        self.se_reduction = int(se_reduction)
        self.use_aspp = bool(use_aspp)
        self.aspp_rates = tuple(int(r) for r in aspp_rates)
        self.aspp_filters = int(aspp_filters)
        self.decoder_filters = tuple(int(f) for f in decoder_filters)
        self.decoder_convs = int(decoder_convs)
        self.use_refinement = bool(use_refinement)
        self.refine_filters = int(refine_filters)

    def get_config(self):
        return {
            "name": self.name,
            "trainable": self.trainable,
            "input_size": list(self.input_size),
            "class_names": list(self.class_names),
            "hu_window": list(self.hu_window),
            "pre_windowed": self.pre_windowed,
            "stem_filters": self.stem_filters,
            "encoder_filters": list(self.encoder_filters),
            "encoder_blocks": list(self.encoder_blocks),
            "se_reduction": self.se_reduction,
            "use_aspp": self.use_aspp,
            "aspp_rates": list(self.aspp_rates),
            "aspp_filters": self.aspp_filters,
            "decoder_filters": list(self.decoder_filters),
            "decoder_convs": self.decoder_convs,
            "use_refinement": self.use_refinement,
            "refine_filters": self.refine_filters,
        }

    @classmethod
    def from_config(cls, config):
        return from_config_keeping_trainable(cls, config)

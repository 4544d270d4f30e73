"""Keras Applications backbones: ImageNet weights download into the Keras cache on first use.

Each record names its `keras.applications` constructor; Keras is imported when a model is
built, so listing the backbones imports no TensorFlow.
"""

from __future__ import annotations

from tlcore.backbones.registry import BackboneSpec, register

_GCS = "https://storage.googleapis.com/tensorflow/keras-applications/"


def _app(constructor: str, **extra):
    def build(image_size: int, weights_path: str | None):
        import keras

        return getattr(keras.applications, constructor)(
            include_top=False,
            weights=weights_path,
            input_shape=(image_size, image_size, 3),
            pooling=None,
            **extra,
        )

    return build


def _keras(name, display, constructor, preprocessing, size, file, url, top1, params, min_size=32, **extra):
    register(BackboneSpec(
        name=name,
        display_name=display,
        build=_app(constructor, **extra),
        preprocessing=preprocessing,
        default_size=size,
        weights_file=file,
        weights_url=url + file,
        weights_origin="Keras Applications (downloaded on first use into the Keras cache)",
        license="see keras.io/api/applications",
        imagenet_top1=top1,
        params_m=params,
        min_size=min_size,
    ))


_keras("vgg16", "VGG16", "VGG16", "caffe", 224,
       "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "vgg16/", 0.713, 138.4)
_keras("resnet50", "ResNet50", "ResNet50", "caffe", 224,
       "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "resnet/", 0.749, 25.6)
_keras("inception_v3", "InceptionV3", "InceptionV3", "tf", 299,
       "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "inception_v3/", 0.779, 23.9,
       min_size=75)
_keras("xception", "Xception", "Xception", "tf", 299,
       "xception_weights_tf_dim_ordering_tf_kernels_notop.h5", _GCS + "xception/", 0.790, 22.9,
       min_size=71)
_keras("mobilenet_v2", "MobileNetV2", "MobileNetV2", "tf", 224,
       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5", _GCS + "mobilenet_v2/",
       0.713, 3.5)
_keras("mobilenet_v3_small", "MobileNetV3Small", "MobileNetV3Small", "raw", 224,
       "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5", _GCS + "mobilenet_v3/", 0.682, 2.5)
_keras("mobilenet_v3_large", "MobileNetV3Large", "MobileNetV3Large", "raw", 224,
       "weights_mobilenet_v3_large_224_1.0_float_no_top_v2.h5", _GCS + "mobilenet_v3/", 0.752, 5.5)
_keras("efficientnet_b0", "EfficientNetB0", "EfficientNetB0", "raw", 224,
       "efficientnetb0_notop.h5", "https://storage.googleapis.com/keras-applications/", 0.771, 5.3)
_keras("efficientnet_v2_b0", "EfficientNetV2B0", "EfficientNetV2B0", "raw", 224,
       "efficientnetv2-b0_notop.h5", _GCS + "efficientnet_v2/", 0.787, 7.2)
_keras("convnext_tiny", "ConvNeXtTiny", "ConvNeXtTiny", "raw", 224,
       "convnext_tiny_notop.h5", _GCS + "convnext/", 0.813, 28.6)

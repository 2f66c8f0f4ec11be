"""The ImageNet networks and what is computed from them once: VGG16 with the seed's CAM head
(`vgg16`, `cam`), MobileNetV2's patch maps (`mobilenet`) and the on-disk feature store (`store`)."""

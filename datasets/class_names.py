"""Class names used in the prompts."""
import importlib.util
import sys
from pathlib import Path


def _open_clip_metadata():
    """open_clip's zero_shot_metadata (CLIP's ImageNet class names and templates). The file imports nothing, but
    importing it as open_clip.zero_shot_metadata imports open_clip and so torch, which the data-set registry does
    not need otherwise (the commands that only read files): it is run on its own unless open_clip is loaded."""
    loaded = sys.modules.get("open_clip.zero_shot_metadata")
    if loaded is not None:
        return loaded
    package = importlib.util.find_spec("open_clip")      # finds the package without running it
    path = Path(package.submodule_search_locations[0]) / "zero_shot_metadata.py"
    spec = importlib.util.spec_from_file_location("_open_clip_zero_shot_metadata", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_METADATA = _open_clip_metadata()
IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES = _METADATA.IMAGENET_CLASSNAMES, _METADATA.OPENAI_IMAGENET_TEMPLATES

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# CIFAR-100 fine labels in label order; "_" is read as a space in prompts.
_CIFAR100_FINE = """apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin
elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man
maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain
plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split()
CIFAR100_CLASSES = [name.replace("_", " ") for name in _CIFAR100_FINE]

# The CLIP authors' curated ImageNet names (as used by CLIP and TPT), in wnid-sorted class order.
IMAGENET_CLASSES = list(IMAGENET_CLASSNAMES)

# CLIP's 18 CIFAR templates and 80 ImageNet templates (CLIP.PROMPT_MODE ensemble).
CIFAR_TEMPLATES = [
    "a photo of a {}.", "a blurry photo of a {}.", "a black and white photo of a {}.",
    "a low contrast photo of a {}.", "a high contrast photo of a {}.", "a bad photo of a {}.",
    "a good photo of a {}.", "a photo of a small {}.", "a photo of a big {}.", "a photo of the {}.",
    "a blurry photo of the {}.", "a black and white photo of the {}.", "a low contrast photo of the {}.",
    "a high contrast photo of the {}.", "a bad photo of the {}.", "a good photo of the {}.",
    "a photo of the small {}.", "a photo of the big {}.",
]
IMAGENET_TEMPLATES = [template("{}") for template in OPENAI_IMAGENET_TEMPLATES]

# CoOp's template for ImageNet and its variants (CLIP.PROMPT_MODE coop; CoOp trainers/zsclip.py).
COOP_IMAGENET_TEMPLATES = ["a photo of a {}."]
# The seven templates TDA's code uses for ImageNet, ImageNet-A and ImageNet-V2 (and Caltech101, StanfordCars,
# SUN397); CLIP's "selected" ImageNet subset. For ImageNet-R and ImageNet-Sketch TDA uses all 80
# (IMAGENET_TEMPLATES, in another order: the ensemble is their mean, so the order does not matter).
TDA_SELECTED_TEMPLATES = ["itap of a {}.", "a bad photo of the {}.", "a origami {}.", "a photo of the large {}.",
                          "a {} in a video game.", "art of the {}.", "a photo of the small {}."]

assert len(CIFAR100_CLASSES) == 100 and len(IMAGENET_CLASSES) == 1000 and len(IMAGENET_TEMPLATES) == 80

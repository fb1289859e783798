"""Task plugin: the field's few-shot benchmarks, read from local files in their published
layouts and split as published (never downloaded); one task per benchmark, one reader
module per format, the shared part in ``benchmark``."""

from autometa import hookimpl

#: (registered name, module:class, description): one task per benchmark.
TASKS = (
    ("mini-imagenet", "mini_imagenet:MiniImageNet",
     "miniImageNet from local files: Ravi & Larochelle's CSVs over images/, 64/16/20 classes"),
    ("tiered-imagenet", "tiered_imagenet:TieredImageNet",
     "tieredImageNet from local files: {train,val,test}/<wnid>/ folders or Ren et al.'s "
     "PNG pickles, 351/97/160 classes"),
    ("cifar-fs", "cifar:CifarFS",
     "CIFAR-FS from CIFAR-100's python pickles: Bertinetto et al.'s 64/16/20 class split"),
    ("fc100", "cifar:FC100",
     "FC100 from CIFAR-100's python pickles: Oreshkin et al.'s 12/4/4 superclass split"),
    ("cub", "cub:CUB",
     "CUB-200-2011 from local files: Chen et al.'s 100/50/50 class split"),
    ("omniglot", "omniglot:Omniglot",
     "Omniglot from local files: Lake et al.'s background/evaluation alphabets, seeded "
     "meta-val alphabets"),
)


@hookimpl
def register_tasks(register):
    for name, target, description in TASKS:
        register(name, f"autometa_plugins.fewshot_datasets.{target}", description=description)

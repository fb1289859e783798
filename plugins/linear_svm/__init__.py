"""Meta-algorithm plugin: a linear support vector machine fitted per episode on frozen
features (scikit-learn's LinearSVC), a baseline that never meta-trains."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "linear-svm",
        "autometa_plugins.linear_svm.algorithm:LinearSVM",
        description="linear SVM per episode on frozen features, no meta-training "
                    "(scikit-learn LinearSVC; MetaOptNet's head without meta-training)",
    )

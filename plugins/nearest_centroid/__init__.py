"""Meta-algorithm plugin: nearest class mean on frozen features (ProtoNet's inference,
SimpleShot's centring and L2 normalisation), a baseline that never meta-trains."""

from autometa import hookimpl


@hookimpl
def register_meta_algorithms(register):
    register(
        "nearest-centroid",
        "autometa_plugins.nearest_centroid.algorithm:NearestCentroid",
        description="nearest class mean on frozen features, no meta-training "
                    "(Snell et al. 2017; SimpleShot, Wang et al. 2019)",
    )

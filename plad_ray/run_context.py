"""What every stage needs beside its own config section: where the run's outputs go, whether its cluster has GPUs,
where models on object storage are fetched to on each node, the held-out split every stage keeps to, and the run's
settings as trackers record them. The pipeline builds it once (Config.context)."""

from dataclasses import dataclass, field

from plad_ray.data.layout import OutputLayout
from plad_ray.models.cache import local_model


@dataclass(frozen=True)
class RunContext:
    layout: OutputLayout  # output_dir's stage folders (plad_ray.data.layout)
    use_gpu: bool  # cluster.use_gpu
    model_cache: str  # cluster.model_cache
    heldout_fraction: float  # data.heldout_fraction: the prompts whose pairs are held out, by id
    settings: dict = field(default_factory=dict, compare=False)  # the config, secrets redacted (Config.to_safe_dict)

    def student_after(self, round: int) -> str:
        """Round `round`'s exported student as a local folder on every node (a URI output_dir's export is fetched to
        the model cache)."""
        return local_model(self.layout.student(round), self.model_cache)

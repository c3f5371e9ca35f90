"""Which block at which depth.

A layout is a sequence of block kinds. A dense DiT is all `dense`. A FlexDiT is
`pool` blocks at the bottom, SDTMs in the middle (each: `gen` x a, `sparse` x b, one `recover`,
`dense` x d) and `dense` blocks on top. The compact spec "2+4x1-3-1-1+2" reads:
2 Poolingformer blocks + 4 SDTMs of [1 gen, 3 sparse, 1 recover, 1 dense] + 2 dense blocks.
"""
import re
from dataclasses import dataclass

from flexdit.errors import FlexDiTError
from flexdit.nn.blocks import BLOCK_KINDS, DENSE, GEN, POOL, RECOVER, SPARSE

_SPEC = re.compile(r"^(\d+)\+(\d+)x(\d+)-(\d+)-(\d+)-(\d+)\+(\d+)$")

# The paper's layout for 28 layers; analogues for 24 and 12 layers (paper gives none), chosen to keep
# 2 Poolingformers and one SDTM shape: L keeps 4 SDTMs and 2 top blocks with 2 sparse blocks per SDTM;
# S/B keep 2 SDTMs of [1, 2, 1, 1] and use the last SDTM's dense block as the top block.
DEFAULT_SPECS = {28: "2+4x1-3-1-1+2", 24: "2+4x1-2-1-1+2", 12: "2+2x1-2-1-1+0"}


@dataclass(frozen=True)
class Layout:
    kinds: tuple[str, ...]

    def __post_init__(self):
        object.__setattr__(self, "kinds", tuple(self.kinds))
        self.validate()

    # --- constructors -------------------------------------------------------------------------
    @classmethod
    def dense(cls, depth: int) -> "Layout":
        return cls((DENSE,) * depth)

    @classmethod
    def flexdit(cls, pool: int, sdtms: int, gen: int = 1, sparse: int = 3, recover: int = 1,
                dense: int = 1, top: int = 2) -> "Layout":
        sdtm = (GEN,) * gen + (SPARSE,) * sparse + (RECOVER,) * recover + (DENSE,) * dense
        return cls((POOL,) * pool + sdtm * sdtms + (DENSE,) * top)

    @classmethod
    def default_flexdit(cls, depth: int) -> "Layout":
        if depth not in DEFAULT_SPECS:
            raise FlexDiTError(
                f"no default FlexDiT layout for depth {depth} (defaults exist for {sorted(DEFAULT_SPECS)}); "
                "give one, e.g. --layout 2+4x1-3-1-1+2"
            )
        return cls.parse(DEFAULT_SPECS[depth])

    @classmethod
    def parse(cls, spec: str, depth: int | None = None) -> "Layout":
        """'dense', 'default', 'P+SxG-S-R-D+T', or a comma list of kinds ('pool,gen,recover,dense')."""
        spec = spec.strip().replace(" ", "")
        if spec in ("dense", "default"):
            if depth is None:
                raise FlexDiTError(f"layout {spec!r} needs the model depth")
            return cls.dense(depth) if spec == "dense" else cls.default_flexdit(depth)
        match = _SPEC.match(spec)
        dense = re.fullmatch(r"densex(\d+)", spec)  # what str() prints for a dense layout
        if dense:
            layout = cls.dense(int(dense.group(1)))
        elif match:
            pool, sdtms, gen, sparse, recover, dense, top = map(int, match.groups())
            layout = cls.flexdit(pool, sdtms, gen, sparse, recover, dense, top)
        elif "," in spec or spec in BLOCK_KINDS:
            layout = cls(tuple(spec.split(",")))
        else:
            raise FlexDiTError(
                f"cannot read layout {spec!r}; use 'dense', 'default', a spec like '2+4x1-3-1-1+2' "
                "(pool + SDTMs x gen-sparse-recover-dense + top) or a comma list of block kinds"
            )
        if depth is not None and len(layout) != depth:
            raise FlexDiTError(f"layout {spec!r} has {len(layout)} blocks but the model has {depth}; "
                               f"give a layout of depth {depth}")
        return layout

    # --- properties -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.kinds)

    @property
    def is_dense(self) -> bool:
        return GEN not in self.kinds and POOL not in self.kinds

    @property
    def has_sparse_tokens(self) -> bool:
        return GEN in self.kinds

    @property
    def num_sdtms(self) -> int:
        return self.kinds.count(RECOVER)

    def __str__(self) -> str:
        """The compact spec when the layout has that form, else the comma list of kinds."""
        if all(k == DENSE for k in self.kinds):
            return f"dense x{len(self)}"
        pool = next((i for i, k in enumerate(self.kinds) if k != POOL), len(self.kinds))
        rest = self.kinds[pool:]
        if GEN in rest:
            # One SDTM unit: its gen..recover run plus the dense blocks before the next SDTM (if any).
            end = rest.index(RECOVER) + 1
            if GEN in rest[end:]:
                end = end + rest[end:].index(GEN)
            unit = rest[:end]
            sdtms = 0
            while rest[sdtms * len(unit):(sdtms + 1) * len(unit)] == unit:
                sdtms += 1
            top = rest[sdtms * len(unit):]
            counts = [unit.count(k) for k in (GEN, SPARSE, RECOVER, DENSE)]
            if Layout.flexdit(pool, sdtms, *counts, top=len(top)).kinds == self.kinds:
                return f"{pool}+{sdtms}x{'-'.join(map(str, counts))}+{len(top)}"
        return ",".join(self.kinds)

    # --- validation -----------------------------------------------------------------------------
    def validate(self) -> None:
        """Dense tokens outside SDTMs; inside: gen+ sparse* recover. Pool blocks only on dense tokens."""
        unknown = [k for k in self.kinds if k not in BLOCK_KINDS]
        if unknown:
            raise FlexDiTError(f"unknown block kind {unknown[0]!r} in layout; use {', '.join(BLOCK_KINDS)}")
        if not self.kinds:
            raise FlexDiTError("a layout needs at least one block")
        in_sdtm = False
        for i, (prev, kind) in enumerate(zip((None,) + self.kinds, self.kinds)):
            if kind == GEN and in_sdtm and prev != GEN:
                raise FlexDiTError(f"layout block {i}: a new SDTM starts before the previous one recovered "
                                   "dense tokens; put a 'recover' block first")
            if kind in (SPARSE, RECOVER) and not in_sdtm:
                raise FlexDiTError(f"layout block {i}: '{kind}' needs sparse tokens; start the SDTM with 'gen'")
            if kind in (POOL, DENSE) and in_sdtm:
                raise FlexDiTError(f"layout block {i}: '{kind}' runs on dense tokens but the SDTM is still "
                                   "sparse; close it with 'recover'")
            if kind == GEN:
                in_sdtm = True
            elif kind == RECOVER:
                in_sdtm = False
        if in_sdtm:
            raise FlexDiTError("layout ends inside an SDTM; end it with a 'recover' block")

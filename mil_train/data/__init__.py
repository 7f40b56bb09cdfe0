"""Bags as TensorDicts, padding into batches, graphs from tile coords, readers and a synthetic generator.

See DESIGN.md section 2 for the bag keys and shapes.
"""

from mil_train.data.bag import make_bag
from mil_train.data.collate import collate
from mil_train.data.dataset import MILDataset, with_graph
from mil_train.data.graphs import GRAPH_RULES, batch_graph, build_graph
from mil_train.data.readers import level0_stride, load_array, read_clam_h5, read_mil_csv
from mil_train.data.spatial import seq_to_spatial, spatial_to_seq
from mil_train.data.synthetic import synthetic_bags
from mil_train.data.torchmil_folder import TorchmilFolderDataset

__all__ = [
    "GRAPH_RULES",
    "MILDataset",
    "TorchmilFolderDataset",
    "batch_graph",
    "build_graph",
    "collate",
    "level0_stride",
    "load_array",
    "make_bag",
    "read_clam_h5",
    "read_mil_csv",
    "seq_to_spatial",
    "spatial_to_seq",
    "synthetic_bags",
    "with_graph",
]

"""Record keys and metric names shared by the server and the clients.

Every name that crosses the wire lives here, so the two sides cannot drift apart.
"""

from typing import Final

# RecordDict entries
ARRAYS: Final = "arrays"
METRICS: Final = "metrics"
CONFIG: Final = "config"

# ConfigRecord keys sent by the server
TASK: Final = "task"  # JSON of common.config.ClientTask
SERVER_ROUND: Final = "server-round"
SPLIT: Final = "split"
# the test evaluation's extras when the last round is not the best: the last round's number and global adapter
# (an ArrayRecord), which a node personalizing with personalize.start last starts from
LAST_ROUND: Final = "last-round"
LAST_ARRAYS: Final = "last-arrays"

# Secure aggregation (common.secagg): each protocol stage is a message of type "train.<stage>"; its payload is the
# JSON text under SECAGG_PAYLOAD in the ConfigRecord SECAGG (the masked-input stage also carries ARRAYS and CONFIG
# like a plain train message, and its reply carries the masked ARRAYS)
SECAGG: Final = "secagg"
SECAGG_PAYLOAD: Final = "payload"
SECAGG_SETUP: Final = "secagg_setup"  # server: parameters → node: its two public keys
SECAGG_SHARE: Final = "secagg_share"  # server: the neighbours' public keys → node: encrypted shares, by neighbour
SECAGG_MASK: Final = "secagg_mask"  # server: adapter, task, shares for this node → node: its masked input
SECAGG_UNMASK: Final = "secagg_unmask"  # server: who uploaded and who dropped → node: the shares to unmask
SECAGG_PROTOCOL_STAGES: Final = (SECAGG_SETUP, SECAGG_SHARE, SECAGG_UNMASK)  # stages whose replies hold no data

# MetricRecord keys in replies
NUM_EXAMPLES: Final = "num-examples"  # Flower's FedAvg weights by this key
TRAIN_LOSS: Final = "train-loss"
LOSS: Final = "loss"
ACCURACY: Final = "accuracy"
MACRO_F1: Final = "macro-f1"
REGION_INDEX: Final = "region-index"  # position of the region in the run's region list
# a node whose policy requires DP: the privacy spent so far in this run (client.dp). Computed from public
# settings only (noise, sampling rate, steps, delta), never from the data, so every policy lets them leave
DP_EPSILON: Final = "dp-epsilon"
DP_DELTA: Final = "dp-delta"
DP_METRICS: Final = (DP_EPSILON, DP_DELTA)
# every metric a reply can carry, hyphenated like Flower's own num-examples; the run folder's files (metrics.jsonl,
# summary.json) use "_" (macro_f1, num_examples; train-loss becomes the train split's loss)
REPLY_METRICS: Final = (NUM_EXAMPLES, TRAIN_LOSS, LOSS, ACCURACY, MACRO_F1, REGION_INDEX)
# what each reply carries (client.app): `fedlocale check` asks each region's policy about both before a run
TRAIN_REPLY_METRICS: Final = (NUM_EXAMPLES, TRAIN_LOSS, REGION_INDEX)
EVALUATE_REPLY_METRICS: Final = (NUM_EXAMPLES, LOSS, ACCURACY, MACRO_F1, REGION_INDEX)

# Node config keys (``--node-config`` in deployment, injected by Flower in simulation)
NODE_REGION: Final = "region"
NODE_DATA_DIR: Final = "data-dir"
NODE_PARTITION_ID: Final = "partition-id"
NODE_CACHE_DIR: Final = "cache-dir"  # absolute folder on the node's own disk for tokenised data; unset: no cache
NODE_THREADS: Final = "threads"  # torch threads on this node; wins over the run config's train.threads
NODE_POLICY: Final = "policy"  # absolute path of the region's policy file on the node (common.policy)
NODE_AUDIT_DIR: Final = "audit-dir"  # absolute folder of the node's signed egress ledger and its key
NODE_AUGMENT: Final = "augment"  # absolute path of a YAML file of client.augment.AugmentSettings on the node
# absolute path of a YAML file of common.config.PersonalizeSettings: the node personalizes the final global model
NODE_PERSONALIZE: Final = "personalize"
NODE_PERSONAL_DIR: Final = "personal-dir"  # absolute folder where the node keeps its personalized model and report
# absolute folder where the node keeps the global adapters it receives (client.node_audit), for its own privacy
# audit (`fedlocale audit node`); unset: it keeps none
NODE_KEEP_GLOBALS: Final = "keep-globals"
NODE_KEEP_GLOBALS_COUNT: Final = "keep-globals-count"  # how many rounds' global adapters it keeps (default 3)
NODE_NUM_PARTITIONS: Final = "num-partitions"  # Flower's simulation sets it beside partition-id
# every key a node config may hold: a node refuses any other (a mistyped "policy" must not run without the policy)
NODE_KEYS: Final = (
    NODE_REGION,
    NODE_DATA_DIR,
    NODE_PARTITION_ID,
    NODE_NUM_PARTITIONS,
    NODE_CACHE_DIR,
    NODE_THREADS,
    NODE_POLICY,
    NODE_AUDIT_DIR,
    NODE_AUGMENT,
    NODE_PERSONALIZE,
    NODE_PERSONAL_DIR,
    NODE_KEEP_GLOBALS,
    NODE_KEEP_GLOBALS_COUNT,
)

# Run config keys (``[tool.flwr.app.config]``)
RUN_CONFIG_PATH: Final = "config"
RUN_OUT_DIR: Final = "out-dir"
RUN_RESUME: Final = "resume"  # true: continue from the out dir's state.json and last checkpoint

# Data splits
TRAIN: Final = "train"
VAL: Final = "val"
TEST: Final = "test"
SPLITS: Final = (TRAIN, VAL, TEST)

# Evaluation modes reported side by side
FEDERATED: Final = "federated"
LOCAL_ONLY: Final = "local_only"
CENTRALIZED: Final = "centralized"
PERSONALIZED: Final = "personalized"  # the model each region serves after personalization (chosen on val)
BASELINES: Final = (CENTRALIZED, LOCAL_ONLY)
# per region in summary.json: the served model minus local-only on test (paired bootstrap), when local-only ran
SERVED_VS_LOCAL_ONLY: Final = "served_vs_local_only"

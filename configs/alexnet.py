"""AlexNet as in Krizhevsky, Sutskever & Hinton (NIPS 2012): the paper's recipe.

Every number from the paper carries its source in a comment; docs/PAPER.md is
the project's specification: "§3.x" are sections of the paper,
"cuda-convnet" the authors' code, which fills the gaps the paper leaves.

Command:
  python launch.py --config=configs/alexnet.py --workdir=/tmp/alexnet \
      --config.data.manual_dir=/path/with/ILSVRC2012_tars

Expected time: ~90 epochs of 10,009 steps; the paper took 5-6 days on two
GTX 580 3GB GPUs (§5). On a modern accelerator the JPEG decoding and
augmentation set the pace (docs/BENCHMARKS_input.md).
Expected result (docs/PAPER.md): 40.7% top-1 / 18.2% top-5 validation error for
one network with 10-crop testing (§6); the centre crop evaluated during
training reads about 2 points higher in top-1 (cuda-convnet2: 42.5% centre
crop vs 40.4% with 10 crops).

Variants (``--config=configs/alexnet.py:VARIANT``):
  demo         the built-in generated data and a small network (also
               configs/demo.py): >= 90% validation top-1 in a few minutes on
               a 2-core CPU.
  no_lrn       ablation: no local response normalisation (§3.3).
  no_overlap   ablation: 2x2/2 pools instead of overlapping 3x3/2 (§3.4).
  one_tower    ablation: one tower, half the kernels in conv1-conv4; conv5 and
               fc6/fc7 whole (§3.2, fn. 2).
  tanh         ablation: tanh instead of ReLU (§3.1).
  deeper, shallower  one conv layer more (another conv4) or fewer (no conv4).
  no_exchange  the towers never exchange features (fc8 still sums them).
  exchange_all the towers exchange before every layer after conv1.
Variants combine: --config=configs/alexnet.py:demo,no_lrn.
"""

import ml_collections


def get_config(variant: str = ''):
  config = ml_collections.ConfigDict()
  config.seed = 0

  # ---------------------------------------------------------------- model
  m = config.model = ml_collections.ConfigDict()
  m.num_classes = 1000  # ILSVRC-2012 has 1000 classes (§2).
  m.num_towers = 2  # Two GPUs, one tower each (§3.2, Figure 2).
  # Kernels per tower in conv1..conv5: 96/256/384/384/256 in total, half on
  # each GPU (§3.5, Figure 2).
  m.conv_features = (48, 128, 192, 192, 128)
  m.fc_features = 2048  # fc6 and fc7: 4096 neurons each, half per GPU (§3.5).
  m.width_multiplier = 1.0  # Scales every conv/fc width (small variants only).
  # Layers whose input is gathered from all towers; fc8 always combines the
  # towers. "The kernels of the third convolutional layer are connected to all
  # kernel maps in the second layer... the neurons in the fully-connected
  # layers are connected to all neurons in the previous layer" (§3.5).
  m.exchange = ('conv3', 'fc6', 'fc7')
  # 224x224 crops give 55x55 conv1 maps in cuda-convnet, whose output size
  # 1 + ceil((2*pad + img - filter) / stride) reads zeros past the
  # bottom/right edge ('cuda-convnet'). 'valid' with 227 crops is Caffe's
  # choice; 'torchvision' pads 2 on every side.
  m.conv1_padding = 'cuda-convnet'
  m.activation = 'relu'  # ReLU (§3.1); 'tanh' for the Figure 1 ablation.
  # Local response normalisation, b = a / (k + alpha sum a^2)^beta over n
  # adjacent maps (§3.3): k=2, n=5, alpha=1e-4, beta=0.75.
  m.use_lrn = True
  m.lrn_k = 2.0
  m.lrn_n = 5
  m.lrn_alpha = 1e-4
  m.lrn_beta = 0.75
  # cuda-convnet2 and Caffe divide alpha by n; the paper does not.
  m.lrn_alpha_over_n = False
  # Overlapping max pooling, z=3, s=2 (§3.4).
  m.pool_window = 3
  m.pool_stride = 2
  m.dropout_rate = 0.5  # Dropout 0.5 in fc6 and fc7 (§4.2).
  # "At test time, we use all the neurons but multiply their outputs by 0.5"
  # (§4.2): 'paper' zeroes units in training and scales at test time;
  # 'inverted' (modern frameworks) scales the kept units in training instead.
  m.dropout_scaling = 'paper'
  # Weights ~ N(0, 0.01); biases 1 in conv2, conv4, conv5 and the hidden fc
  # layers, 0 elsewhere (§5). 'he' is the modern alternative (biases 0).
  m.init_scheme = 'paper'
  m.init_stddev = 0.01
  m.init_bias_one = ('conv2', 'conv4', 'conv5', 'fc6', 'fc7')
  m.dtype = 'float32'  # Activations/matmuls; 'bfloat16' for mixed precision.
  # The max-pool's and LRN's gradients (speed only, the same numbers):
  # hand-written ('custom') or XLA's own ('xla'); 'auto' is the faster on
  # each backend: custom on the CPU, XLA's on GPU and TPU
  # (alexnet_jax/backends.py, docs/BENCHMARKS.md).
  m.max_pool_grad = 'auto'
  m.lrn_grad = 'auto'

  # ----------------------------------------------------------------- mesh
  # ('data', 'tower') device mesh. -1: the tower axis takes num_towers devices
  # when the device count is a multiple of num_towers (else 1: every tower on
  # each device), the data axis the rest.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.tower_axis_size = -1
  config.mesh.data_axis_size = -1

  # ------------------------------------------------------------ optimizer
  # v <- 0.9 v - 0.0005 lr w - lr g;  w <- w + v   (§5).
  o = config.optim = ml_collections.ConfigDict()
  o.learning_rate = 0.01  # "initialized at 0.01" (§5).
  o.momentum = 0.9  # §5.
  o.weight_decay = 5e-4  # §5.
  # The paper decays every parameter at lr x1; cuda-convnet (and Caffe) decay
  # weights only and give biases twice the learning rate.
  o.decay_biases = True
  o.bias_lr_multiplier = 1.0

  # ---------------------------------------------------------- training
  config.batch_size = 128  # "batch size of 128 examples" (§5).
  config.num_epochs = 90  # "roughly 90 cycles through the training set" (§5).
  # Fine-tuning (the pre-trained models marked * in Table 2): another run's
  # workdir (or its checkpoints/ directory) and which checkpoint ('latest',
  # 'best' or a step number). Every layer but fc8 starts from it; fc8 is
  # initialised afresh for model.num_classes, the optimizer state is fresh
  # and the step is 0. Ignored once this workdir holds its own checkpoints.
  config.init_from = ''
  config.init_from_step = 'latest'

  # ----------------------------------------------------------------- data
  d = config.data = ml_collections.ConfigDict()
  # 'imagenet2012' | 'demo' | 'folder' | 'synthetic' (random images made on
  # the devices: the training loop timed without an input pipeline).
  d.dataset = 'imagenet2012'
  d.manual_dir = ''  # Holds ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar.
  d.data_dir = ''  # tfds data dir; '' is tfds's default (~/tensorflow_datasets).
  d.folder = ''  # For dataset='folder': root with train/<class>/*, val/<class>/*.
  d.resize_size = 256  # Shorter side to 256, central 256x256 (§2).
  d.crop_size = 224  # Random 224x224 crops (§4.1).
  d.random_flip = True  # Horizontal reflections (§4.1).
  d.pca_noise = True  # Altering RGB intensities (§4.1).
  d.pca_alpha_stddev = 0.1  # alpha ~ N(0, 0.1) (§4.1).
  # RGB covariance eigen-decomposition used by cuda-convnet on the 0-255 scale:
  # eigenvectors as columns, and their code scales by standard deviations.
  d.pca_eigvecs = ((0.418, -0.713, -0.564),
                   (-0.817, -0.024, -0.576),
                   (0.397, 0.701, -0.592))
  d.pca_stddevs = (19.72, 37.09, 121.78)
  # "Subtracting the mean activity over the training set from each pixel"
  # (§2): 'image', the training set's per-pixel mean image, computed once
  # (python -m alexnet_jax.prepare, or on first use in a single process) and
  # cached next to the dataset; 'channel', the per-channel constants below
  # (cuda-convnet's values). mean_image_path, if set, names a mean image .npy
  # to use instead of either.
  d.mean = 'image'
  d.mean_image_path = ''
  d.channel_means = (127.3, 119.7, 104.9)
  # Antialiased bilinear resize to 256 (the paper does not say which filter).
  d.resize_antialias = True
  # Train crops are resampled straight from the decoded image (no 256x256
  # float image): antialiased only when downscaling by more than this factor,
  # plain bilinear at the same sampling points otherwise (alexnet_jax/
  # preprocess.py decode_crop_resize; docs/BENCHMARKS_input.md).
  d.train_antialias_above = 2.0
  # That bilinear resample: 'native' is a compiled op (alexnet_jax/
  # resample.cc, built with $CXX on first use, then cached), 'tf'
  # TensorFlow's crop_and_resize (the same crops, slower augmentation), 'auto'
  # native if it builds, else tf with a warning (alexnet_jax/native.py).
  d.resample = 'auto'
  # A copy written by `python -m alexnet_jax.prepare --config=...
  # --copy_dir=DIR` (pre-resized JPEGs, the paper's trick) or `--decoded_dir=
  # DIR` (raw uint8 pixels, local disk only); '' reads the dataset itself.
  d.prepared_dir = ''
  # Records are shuffled inside fixed windows of this many (after permuting
  # the shards each epoch), so a restart can jump to any step cheaply.
  d.shuffle_buffer = 10_000
  # Batches decoded in parallel (each by one of that many workers); -1: one
  # per CPU core.
  d.num_parallel_calls = -1
  d.prefetch = 2  # Global batches prepared ahead of the step.
  # dataset='demo': generated ILSVRC2012-format archives (alexnet_jax/
  # demo_data.py), one shape/pattern kind per class, varied images.
  d.demo_num_classes = 10
  d.demo_train_per_class = 260
  d.demo_val_per_class = 50
  d.demo_image_size = (60, 160)  # Image sides drawn in [min, max] pixels.
  # dataset='synthetic': examples in an epoch and in the validation set.
  d.synthetic_train_examples = 1_281_167  # As ImageNet's training set.
  d.synthetic_eval_examples = 1_024

  # ---------------------------------------------------- schedule (§5)
  # "We used an equal learning rate for all layers, which we adjusted
  # manually throughout training. The heuristic which we followed was to
  # divide the learning rate by 10 when the validation error rate stopped
  # improving with the current learning rate ... reduced three times prior
  # to termination" (§5). alexnet_jax/schedules.py.
  s = config.schedule = ml_collections.ConfigDict()
  s.kind = 'plateau'  # 'plateau' (§5) | 'steps' | 'constant'.
  s.factor = 0.1  # "divide the learning rate by 10" (§5).
  s.max_drops = 3  # "reduced three times prior to termination" (§5).
  # Not in the paper (the authors watched the curves by hand): a drop after
  # `patience` evaluations (one per epoch) without a `min_delta` improvement
  # of the best validation top-1 error, which puts three drops inside ~90
  # epochs.
  s.patience = 4
  s.min_delta = 0.001
  # kind='steps': divide by `factor` at these epochs (not the paper's: 30 and
  # 60 as torchvision's recipe, plus a third drop at 80 for a 90-epoch run).
  s.boundaries_epochs = (30.0, 60.0, 80.0)
  s.warmup_epochs = 0.0  # Linear warm-up; the paper has none.

  # ----------------------------------------------------------- run length
  # Overrides num_epochs when > 0 (tests, quick looks).
  config.total_steps = 0

  # ----------------------------------------------------------- evaluation
  # Top-1/top-5 error of the centre crop on the whole validation set; the
  # first and the last step always evaluate. The plateau rule reads it.
  e = config.eval = ml_collections.ConfigDict()
  e.every_epochs = 1.0
  e.every_steps = 0  # 0: not by steps.

  # ---------------------------------------------------------- checkpoints
  # orbax-checkpoint, asynchronous and atomic, in <workdir>/checkpoints.
  c = config.checkpoint = ml_collections.ConfigDict()
  c.every_epochs = 1.0
  c.every_steps = 0  # 0: not by steps.
  c.keep = 3  # The latest `keep` checkpoints ...
  c.keep_best = 1  # ... plus the best `keep_best` by validation top-1 error.
  c.async_save = True

  # ----------------------------------------------------------------- logs
  config.log_every_steps = 100  # Progress line and TensorBoard scalars.
  # A profiler trace of steps [start_step, start_step + num_steps) in the
  # workdir, for TensorBoard's profile plugin (0: none).
  config.profile = ml_collections.ConfigDict()
  config.profile.start_step = 0
  config.profile.num_steps = 5

  # -------------------------------------------------------------- figures
  # PNGs in <workdir>/figures/ and images in TensorBoard (alexnet_jax/
  # run_outputs.py): conv1 kernels (Figure 3) and tower specialisation at
  # each evaluation; top-5 guesses (Figure 4 left) and training curves at the
  # end, and the nearest neighbours (Figure 4 right) if `nearest_neighbours`:
  # one more pass over the whole training split (about an hour on ImageNet,
  # hence off here; the demo turns it on).
  f = config.figures = ml_collections.ConfigDict()
  f.enabled = True
  f.num_images = 6  # Validation images in top5.png / nearest_neighbours.png.
  f.nearest_neighbours = False
  f.num_neighbours = 6  # Figure 4 right: six training images per query.

  for name in filter(None, variant.split(',')):
    if name not in VARIANTS:
      raise ValueError(f'Unknown config variant {name!r}; valid: '
                       f'{", ".join(VARIANTS)}.')
    VARIANTS[name](config)
  return config


def saved_run_defaults():
  """The defaults of fields a saved run's config.json predates
  (run_dir.load_config): get_config()'s, except where a new field's default
  changed what the code did before it existed; there, the old behaviour."""
  config = get_config()
  config.model.dropout_scaling = 'inverted'  # Dropout was inverted before.
  config.data.mean = 'channel'  # The mean image was used only if a path.
  return config


# ------------------------------------------------------------------ variants
def demo(config):
  """The built-in generated data and a small network, end to end on a
  laptop CPU: 10 pattern classes in ILSVRC2012-format archives
  (alexnet_jax/demo_data.py) built through tfds's imagenet2012 builder, and
  the paper's two-tower network slimmed down (a quarter of the kernels, 64x64
  crops of 72x72 images) with the paper's optimizer and augmentation; no
  dropout (too few units to drop at this width), N(0, 0.03) weights (0.01
  stalls this thin net at ln 10) and a fixed lr drop after epoch 18 instead
  of the plateau rule. Expected: >= 90% validation top-1 accuracy in a few
  minutes on a 2-core CPU (README.md, "The demo")."""
  d = config.data
  d.dataset = 'demo'
  d.mean = 'channel'  # The per-channel constants: nothing to compute.
  d.resize_size = 72  # Small images: shorter side to 72, central 72x72 ...
  d.crop_size = 64  # ... random 64x64 crops (conv1 maps 15x15, pool5 1x1).

  m = config.model
  m.num_classes = d.demo_num_classes
  m.width_multiplier = 0.25  # 12/32/48/48/32 kernels per tower.
  m.fc_features = 512  # x0.25: 128 units per tower in fc6 and fc7.
  # The paper's N(0, 0.01) leaves a network this thin with a signal the
  # constant biases of 1 drown (the loss sits at ln(10)); N(0, 0.03) trains.
  m.init_stddev = 0.03
  # Dropout (§4.2) fights the overfitting of a 60M-parameter network; with
  # 128 units per tower it only slows this one down.
  m.dropout_rate = 0.0

  config.batch_size = 64
  config.num_epochs = 24
  config.schedule.kind = 'steps'  # The plateau rule needs more evaluations.
  config.schedule.boundaries_epochs = (18.0,)
  config.eval.every_epochs = 4.0
  config.checkpoint.every_epochs = 4.0
  config.log_every_steps = 40
  # Figure 4 right: one more pass over the 2,600 training images.
  config.figures.nearest_neighbours = True


def no_lrn(config):
  config.model.use_lrn = False  # §3.3 ablation: +1.4% top-1 without it.


def no_overlap(config):
  config.model.pool_window = 2  # §3.4 ablation: s = z = 2.


def one_tower(config):
  """§3.2: one GPU with half the kernels per conv layer, except conv5 and
  the fc layers, kept whole so the parameter count stays close (fn. 2).
  Applied to the current widths, so 'demo,one_tower' halves the demo."""
  m = config.model
  m.num_towers = 1
  m.conv_features = tuple(m.conv_features[:-1]) + (2 * m.conv_features[-1],)
  m.fc_features = 2 * m.fc_features


def tanh(config):
  config.model.activation = 'tanh'  # §3.1, Figure 1.


# Depth +/- one conv layer (§1: "removing any convolutional layer resulted in
# inferior performance"): another 3x3 layer like conv4 before conv5, or conv4
# removed. The conv layers after it are renamed (conv5 <-> conv6), and so are
# their entries in the per-layer settings (exchange, init_bias_one).
def _renumber_convs(model, shift, new=None, like=None):
  """Per-layer settings with conv<k> (k >= 5) renamed conv<k + shift>,
  conv4 dropped if shift < 0, and layer `new` given what `like` had."""
  def rename(names):
    out = []
    for name in names:
      k = int(name[4:]) if name.startswith('conv') else 0
      if k >= 5:
        out.append(f'conv{k + shift}')
      elif not (shift < 0 and k == 4):
        out.append(name)
      if name == like:
        out.append(new)
    return tuple(out)
  model.exchange = rename(model.exchange)
  model.init_bias_one = rename(model.init_bias_one)


def deeper(config):
  m = config.model
  f = list(m.conv_features)
  m.conv_features = tuple(f[:4] + [f[3]] + f[4:])
  _renumber_convs(m, +1, new='conv5', like='conv4')


def shallower(config):
  m = config.model
  f = list(m.conv_features)
  m.conv_features = tuple(f[:3] + f[4:])
  _renumber_convs(m, -1)


def no_exchange(config):
  """The towers never read each other's maps; only fc8 sums their logits."""
  config.model.exchange = ()


def exchange_all(config):
  """Every layer after conv1 reads both towers (a one-tower net's
  connectivity, split over two devices), at the current depth."""
  m = config.model
  m.exchange = tuple(f'conv{k}' for k in range(2, len(m.conv_features) + 1)
                     ) + ('fc6', 'fc7')


VARIANTS = {f.__name__: f for f in (demo, no_lrn, no_overlap, one_tower, tanh,
                                    deeper, shallower, no_exchange,
                                    exchange_all)}

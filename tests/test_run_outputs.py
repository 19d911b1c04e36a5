"""What a run writes besides checkpoints: figures, communication.json; and
fine-tuning from another run (all layers but fc8)."""

import json
import os

import jax
import numpy as np
from PIL import Image
import pytest

from alexnet_jax import figures
from alexnet_jax import run_outputs
from alexnet_jax import train
from tests import train_helpers as th


@pytest.fixture(scope='module')
def source_run(data_dir, tmp_path_factory):
  """A tiny 4-class run with every figure on."""
  workdir = str(tmp_path_factory.mktemp('source'))
  config = th.tiny_config(data_dir, total_steps=3,
                          **{'figures.enabled': True,
                             'figures.nearest_neighbours': True,
                             'figures.num_images': 3,
                             'figures.num_neighbours': 2})
  state, _ = train.train_and_evaluate(config, workdir)
  return workdir, config, jax.device_get(state.params)


def _png(path):
  with Image.open(path) as im:
    assert im.format == 'PNG'
    return np.asarray(im.convert('RGB'))


def test_a_run_writes_its_figures_and_communication(source_run):
  workdir, config, params = source_run
  d = os.path.join(workdir, run_outputs.FIGURES)
  assert sorted(os.listdir(d)) == sorted(
      f'{n}.png' for n in ('conv1_kernels', 'tower_specialisation', 'top5',
                           'nearest_neighbours', 'training_curves'))
  # Figure 3 of the last evaluation: the final kernels, 2 x 6 tiles.
  grid, tiles = figures.conv1_kernel_grid(params, return_layout=True)
  np.testing.assert_array_equal(_png(os.path.join(d, 'conv1_kernels.png')),
                                grid)
  assert len(tiles) == 12 and {t.tower for t in tiles} == {0, 1}
  # Queries x (query + neighbours) images of 64 x 64 and gaps.
  nn = _png(os.path.join(d, 'nearest_neighbours.png'))
  assert nn.shape[0] == 2 + 3 * (64 + 2) and nn.shape[1] > 3 * 64
  for name in ('top5', 'training_curves', 'tower_specialisation'):
    assert _png(os.path.join(d, f'{name}.png')).std() > 0
  spec = [r for (split, _), r in th.read_metrics(workdir).items()
          if split == 'specialisation']
  assert len(spec) == 2 and 0 <= spec[-1]['tower1_mean'] <= 1
  with open(os.path.join(workdir, 'communication.json')) as f:
    comm = json.load(f)
  assert [r['layer'] for r in comm['layers']] == ['conv3', 'fc6', 'fc7', 'fc8']
  fc6 = comm['layers'][1]
  # fc6 gathers the other tower's pool5 maps (1x1x4 floats in this net),
  # forward and (as a reduce-scatter) backward; one tower per device here.
  assert fc6['forward_bytes_per_image'] == fc6['backward_bytes_per_image'] > 0
  assert fc6['forward_bytes_per_step_per_device'] == (
      fc6['forward_bytes_per_image'] * config.batch_size)


def test_nearest_neighbour_of_a_training_image_is_itself(source_run,
                                                         data_dir):
  workdir, config, params = source_run
  from alexnet_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(2, 2, 1)
  model = model_lib.create_model(config.model)
  params = jax.device_put(params, mesh_lib.param_shardings(mesh, params))
  batch = next(run_outputs.unaugmented_train_batches(config, mesh))
  queries = np.asarray(batch['images'])[[0, 5]]
  fig = run_outputs.nearest_neighbour_figure(config, model, mesh, params,
                                             queries, k=1)
  h = 64
  for i in range(2):  # Each row: the query, then its nearest neighbour.
    top = 2 + i * (h + 2)
    np.testing.assert_array_equal(fig[top:top + h, 2:2 + h],
                                  fig[top:top + h, 2 + h + 8:2 + 2 * h + 8])


def test_fine_tuning_restores_all_but_fc8(source_run, data_dir, tmp_path):
  source, _, source_params = source_run
  three = {'data.demo_num_classes': 3, 'model.num_classes': 3}
  th.prepare_data_with(data_dir, three)
  config = th.tiny_config(data_dir, init_from=source, init_from_step='best',
                          **three)
  from alexnet_jax import mesh as mesh_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import model as model_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import optimizer as optimizer_lib  # pylint: disable=g-import-not-at-top
  from alexnet_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top
  mesh = mesh_lib.make_mesh(2, 2, 1)
  fresh = train_step_lib.create_train_state(
      model_lib.create_model(config.model),
      optimizer_lib.create_optimizer(config.optim), mesh,
      jax.random.PRNGKey(1), config.data.crop_size)
  params = jax.device_get(train.pretrained_params(config, fresh.params, mesh))
  assert set(params) == set(source_params)
  for layer in params:
    if layer == 'fc8':  # Fresh, for 3 classes.
      assert params[layer]['kernel'].shape[-1] == 3
      assert source_params[layer]['kernel'].shape[-1] == 4
      np.testing.assert_array_equal(params[layer]['kernel'],
                                    jax.device_get(fresh.params)[layer]['kernel'])
      continue
    for name in params[layer]:
      np.testing.assert_array_equal(params[layer][name],
                                    source_params[layer][name], err_msg=layer)

  workdir = str(tmp_path / 'tune')
  # Full-batch gradient descent: every step sees all 36 training images,
  # unaugmented, so the training loss must fall.
  config = th.tiny_config(data_dir, total_steps=5, init_from=source,
                          batch_size=36, **three,
                          **{'data.random_flip': False,
                             'data.pca_noise': False, 'eval.every_steps': 0,
                             'checkpoint.every_steps': 0})
  state, _ = train.train_and_evaluate(config, workdir)
  assert int(state.step) == 5
  loss = [r['loss'] for (split, _), r in sorted(th.read_metrics(
      workdir).items()) if split == 'train']
  assert loss[-1] < loss[0], loss


@pytest.mark.parametrize('change', [
    {'model.fc_features': 128},
    # The same layers, but fc6 reads 2x2 maps at this crop size, not 1x1.
    {'data.resize_size': 100, 'data.crop_size': 96}], ids=str)
def test_fine_tuning_another_architecture_fails_clearly(source_run, data_dir,
                                                        tmp_path, change):
  source, _, _ = source_run
  config = th.tiny_config(data_dir, init_from=os.path.join(source,
                                                           'checkpoints'),
                          **change)
  with pytest.raises(ValueError, match=r"differs from this one outside "
                     r"fc8(.|\n)*\['fc6'\]\['kernel'\]"):
    train.train_and_evaluate(config, str(tmp_path))

"""Qualitative pictures: one example's image, ground truth and prediction for every task.

`example_grid` draws a 2 x (1 + tasks) grid: the input image, then one column per task with the
ground truth on top and the prediction below, each task drawn by its kind's `draw` function from
the task registry (freesine_jax/tasks.py):

  classification  class colour maps (PASCAL VOC palette, 255 = ignore in light grey) and a legend
                  of the classes present
  saliency        probabilities in [0, 1] with a colour bar
  edge            edge probabilities, dark on white
  normals         unit vectors as RGB = (n + 1) / 2, invalid pixels black
  depth           values on one colour scale (the label's valid range) with a colour bar

It returns an RGB uint8 array of a fixed size (`grid_shape`), written as PNG by
freesine_jax.evaluate and as a TensorBoard image by training. Matplotlib's Agg canvas is used
directly: no pyplot state, no display needed.
"""
from __future__ import annotations

from typing import Mapping, Sequence

from etils import epath
from matplotlib import colormaps
from matplotlib import patches
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
import numpy as np

from freesine_jax import tasks as tasks_lib
from freesine_jax.data import augment

PANEL_INCHES = 2.5  # each panel is PANEL_INCHES * DPI pixels square
DPI = 80
ROWS = 2  # ground truth, prediction
MAX_LEGEND_ENTRIES = 10
IGNORE_COLOUR = (0.85, 0.85, 0.8)


def grid_shape(num_tasks: int) -> tuple[int, int]:
  """(height, width) in pixels of the grid `example_grid` draws for `num_tasks` tasks."""
  panel = int(round(PANEL_INCHES * DPI))
  return ROWS * panel, (1 + num_tasks) * panel


def class_palette(num_colours: int = 256) -> np.ndarray:
  """The PASCAL VOC colour map (float RGB in [0, 1]): class c's bits spread over R, G, B."""
  palette = np.zeros((num_colours, 3), np.float64)
  for c in range(num_colours):
    r = g = b = 0
    bits = c
    for shift in range(7, -1, -1):
      r |= (bits & 1) << shift
      g |= ((bits >> 1) & 1) << shift
      b |= ((bits >> 2) & 1) << shift
      bits >>= 3
    palette[c] = (r / 255.0, g / 255.0, b / 255.0)
  palette[tasks_lib.IGNORE_INDEX] = IGNORE_COLOUR
  return palette


def image_for_display(image: np.ndarray) -> np.ndarray:
  """An ImageNet-normalised input image back to RGB in [0, 1]."""
  return np.clip(np.asarray(image) * augment.IMAGENET_STD + augment.IMAGENET_MEAN, 0.0, 1.0)


def _clear(ax) -> None:
  ax.set_xticks([])
  ax.set_yticks([])


def _colour_bar(ax, mappable) -> None:
  bar = ax.figure.colorbar(mappable, ax=ax, fraction=0.046, pad=0.03)
  bar.ax.tick_params(labelsize=6)


# ----------------------------------------------------------------------------- per task kind
# draw(ax_label, ax_prediction, label, prediction, *, spec, class_names): label in its batch
# layout (one example), prediction as `metrics.postprocess` returns it (one example).


def draw_class_ids(ax_label, ax_prediction, label, prediction, *, spec, class_names) -> None:
  """Class colour maps; a legend (on the label panel) of the classes present in either."""
  palette = class_palette()
  label = np.asarray(label, np.int64)
  prediction = np.asarray(prediction, np.int64)
  ax_label.imshow(palette[np.clip(label, 0, 255)], interpolation="nearest")
  ax_prediction.imshow(palette[np.clip(prediction, 0, 255)], interpolation="nearest")
  present = sorted(set(np.unique(label).tolist()) | set(np.unique(prediction).tolist()))
  present = [c for c in present if c != tasks_lib.IGNORE_INDEX][:MAX_LEGEND_ENTRIES]
  names = class_names or ()
  handles = [patches.Patch(color=palette[c], label=names[c] if c < len(names) else f"class {c}")
             for c in present]
  if handles:
    ax_label.legend(handles=handles, loc="lower right", fontsize=5, framealpha=0.7,
                    handlelength=1.0, borderpad=0.3, labelspacing=0.2)


def draw_probabilities(ax_label, ax_prediction, label, prediction, *, spec, class_names) -> None:
  """Binary label and predicted probability on one [0, 1] scale, each with a colour bar."""
  cmap = colormaps["viridis"].with_extremes(bad=IGNORE_COLOUR)
  valid = spec.kind.label.valid_pixels(label)
  for ax, values in ((ax_label, np.ma.masked_where(~valid, np.asarray(label, np.float32))),
                     (ax_prediction, np.asarray(prediction, np.float32))):
    _colour_bar(ax, ax.imshow(values, cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest"))


def draw_edges(ax_label, ax_prediction, label, prediction, *, spec, class_names) -> None:
  """Edges dark on white: the binary label and the predicted edge probability."""
  cmap = colormaps["gray_r"].with_extremes(bad=IGNORE_COLOUR)
  valid = spec.kind.label.valid_pixels(label)
  ax_label.imshow(np.ma.masked_where(~valid, np.asarray(label, np.float32)), cmap=cmap,
                  vmin=0.0, vmax=1.0, interpolation="nearest")
  ax_prediction.imshow(np.asarray(prediction, np.float32), cmap=cmap, vmin=0.0, vmax=1.0,
                       interpolation="nearest")


def draw_normals(ax_label, ax_prediction, label, prediction, *, spec, class_names) -> None:
  """Unit vectors as RGB = (n + 1) / 2; invalid (zero) vectors black."""
  for ax, normals in ((ax_label, label), (ax_prediction, prediction)):
    normals = np.asarray(normals, np.float32)
    valid = np.any(normals != 0, axis=-1, keepdims=True)
    ax.imshow(np.where(valid, np.clip((normals + 1.0) / 2.0, 0.0, 1.0), 0.0),
              interpolation="nearest")


def draw_values(ax_label, ax_prediction, label, prediction, *, spec, class_names) -> None:
  """Scalar maps on one colour scale (the label's valid range), each with a colour bar."""
  cmap = colormaps["viridis"].with_extremes(bad="black")
  label = np.asarray(label, np.float32)
  prediction = np.asarray(prediction, np.float32)
  valid = spec.kind.label.valid_pixels(label)
  reference = label[valid] if valid.any() else prediction.ravel()
  low, high = float(np.min(reference)), float(np.max(reference))
  if high <= low:
    high = low + 1.0
  for ax, values in ((ax_label, np.ma.masked_where(~valid, label)), (ax_prediction, prediction)):
    _colour_bar(ax, ax.imshow(values, cmap=cmap, vmin=low, vmax=high, interpolation="nearest"))


# ----------------------------------------------------------------------------- the grid


def example_grid(image: np.ndarray, labels: Mapping[str, np.ndarray],
                 predictions: Mapping[str, np.ndarray], tasks: Sequence[str],
                 class_names: Mapping[str, Sequence[str]] | None = None,
                 title: str = "") -> np.ndarray:
  """RGB uint8 (grid_shape(len(tasks)) + (3,)): image, then per task ground truth / prediction.

  image: one ImageNet-normalised (H, W, 3) input; labels: {task: label} in the batch layout;
  predictions: {task: metrics.postprocess output} for this example.
  """
  height, width = grid_shape(len(tasks))
  fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
  canvas = FigureCanvasAgg(fig)
  axes = fig.subplots(ROWS, 1 + len(tasks), squeeze=False)
  fig.subplots_adjust(left=0.03, right=0.97, bottom=0.03, top=0.86 if title else 0.9,
                      wspace=0.35, hspace=0.15)
  axes[0, 0].imshow(image_for_display(image))
  axes[0, 0].set_title("image", fontsize=8)
  axes[1, 0].axis("off")
  axes[1, 0].text(0.5, 0.5, "top: ground truth\nbottom: prediction", ha="center", va="center",
                  fontsize=7, transform=axes[1, 0].transAxes)
  _clear(axes[0, 0])
  for column, task in enumerate(tasks, start=1):
    spec = tasks_lib.get_task(task)
    draw = tasks_lib.resolve(spec.kind.draw)
    draw(axes[0, column], axes[1, column], labels[task], predictions[task], spec=spec,
         class_names=(class_names or {}).get(task))
    axes[0, column].set_title(task, fontsize=8)
    _clear(axes[0, column])
    _clear(axes[1, column])
  if title:
    fig.suptitle(title, fontsize=9)
  canvas.draw()
  rgb = np.asarray(canvas.buffer_rgba())[..., :3].copy()
  if rgb.shape[:2] != (height, width):
    raise AssertionError(f"grid rendered at {rgb.shape[:2]}, expected {(height, width)}")
  return rgb


def batch_grids(batch: Mapping[str, np.ndarray], predictions: Mapping[str, np.ndarray],
                tasks: Sequence[str], rows: Sequence[int],
                class_names: Mapping[str, Sequence[str]] | None = None,
                titles: Sequence[str] | None = None) -> list[np.ndarray]:
  """`example_grid` of the given rows of a batch and its (post-processed) predictions."""
  grids = []
  for i, row in enumerate(rows):
    grids.append(example_grid(
        batch["image"][row], {t: batch[t][row] for t in tasks},
        {t: predictions[t][row] for t in tasks}, tasks, class_names,
        titles[i] if titles else ""))
  return grids


def to_png(rgb: np.ndarray, path: str) -> None:
  """Writes an RGB uint8 array as PNG (`path` may be a gs:// URL: etils.epath)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  with epath.Path(path).open("wb") as f:
    Image.fromarray(np.asarray(rgb, np.uint8)).save(f, format="PNG")


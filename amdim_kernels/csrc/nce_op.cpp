// The op library amdim_kernels: one definition of the fused NCE loss's forward and backward,
// implemented for CPU (nce_cpu.cpp) and CUDA (nce_cuda.cpp). Autograd and fake-tensor
// (torch.compile) registrations are in amdim_kernels/op_contract.py, called by
// amdim_kernels/extension_ops.py.
#include <Python.h>
#include <torch/library.h>

#include <exception>

#include "nce_cpu_epilogue.h"
#include "nce_op.h"
#include "nce_shared.h"

namespace amdim_kernels {

void check_inputs(const at::Tensor& src, const at::Tensor& trg, const at::Tensor& pos_idx, c10::DeviceType device) {
  TORCH_CHECK(src.dim() == 2 && trg.dim() == 3 && trg.size(2) == src.size(1),
              "amdim_kernels: expected src (N, D) and trg (M, L, D), got ", src.sizes(), " and ", trg.sizes());
  TORCH_CHECK(pos_idx.dim() == 1 && pos_idx.size(0) == src.size(0) && pos_idx.scalar_type() == at::kLong,
              "amdim_kernels: expected pos_idx int64 (N,), got ", pos_idx.scalar_type(), " ", pos_idx.sizes());
  TORCH_CHECK(src.scalar_type() == trg.scalar_type(), "amdim_kernels: src and trg dtypes differ");
  TORCH_CHECK(src.device().type() == device && trg.device() == src.device() && pos_idx.device() == src.device(),
              "amdim_kernels: src, trg and pos_idx must be on one ", c10::DeviceTypeName(device), " device");
}

void check_fwd_grad_args(int64_t N, at::IntArrayRef group_rows, int64_t block_rows) {
  int64_t grouped = 0;
  for (const int64_t rows : group_rows) {
    TORCH_CHECK(rows > 0, "amdim_kernels: nce_fwd_grad's group_rows must be positive, got ", group_rows);
    grouped += rows;
  }
  TORCH_CHECK(!group_rows.empty() && grouped == N, "amdim_kernels: nce_fwd_grad's group_rows must sum to N = ", N,
              ", got ", group_rows);
  TORCH_CHECK(block_rows > 0, "amdim_kernels: nce_fwd_grad's block_rows must be positive, got ", block_rows);
}

BackwardRows empty_backward_rows(const at::Tensor& pos, const at::Tensor& neg_lse) {
  return {at::empty_like(pos, at::MemoryFormat::Contiguous), at::empty_like(neg_lse, at::MemoryFormat::Contiguous),
          at::empty_like(neg_lse, at::MemoryFormat::Contiguous), neg_lse.contiguous()};
}

TORCH_LIBRARY(amdim_kernels, m) {
  // Returns the per-positive loss (N, L), the clipped positive scores (N, L), the negatives'
  // log-sum-exp (N,), each row's sum of raw scores squared (N,), and nce_loss's two scalars:
  // the mean of the loss and reg = reg_weight * mean(a^2) over all N*M*L scores; all float32.
  // cuda_scores: how the CUDA kernels make the scores of 16-bit inputs ("auto", "cublas" or
  // "mma", Settings.cuda_scores); the CPU kernels take no such choice and ignore it.
  m.def("nce_fwd(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, float scale, float reg_weight, "
        "str cuda_scores) "
        "-> (Tensor loss, Tensor pos, Tensor neg_lse, Tensor sq, Tensor mean, Tensor reg)");
  // Gradients of loss_weight * sum(grad_loss * loss) + sq_weight * sum(grad_sq * sq) with
  // respect to src and trg (grad_loss and grad_sq: any strides, 0 included); an input whose
  // need_* flag is false gets an empty tensor. sq (the forward's) bounds each row's |a|, which
  // the CUDA backward's float16 G needs for its scale.
  m.def("nce_bwd(Tensor src, Tensor trg, Tensor pos_idx, Tensor pos, Tensor neg_lse, Tensor sq, Tensor grad_loss, "
        "float loss_weight, Tensor grad_sq, float sq_weight, float? tclip, float scale, str cuda_scores, "
        "bool need_src, bool need_trg) -> (Tensor dsrc, Tensor dtrg)");
  // The three-product schedule (nce_cpu_fused.cpp, nce_cuda_fused.cpp): nce_fwd's outputs, with
  // one mean per group of consecutive source rows (group_rows: their counts, summing to N) in
  // place of the one mean, and the gradients of  sum_k (n_k / N) mean_k + reg  (the mean over
  // all N*L positives + reg), made from blocks of block_rows source rows whose scores are kept
  // whole: float32 on the CPU; on CUDA in the inputs' dtype, d trg in float32 where there are
  // several blocks (amdim_kernels/three_product.py's gradient_dtypes); an input whose need_*
  // flag is false gets an empty gradient.
  m.def("nce_fwd_grad(Tensor src, Tensor trg, Tensor pos_idx, float? tclip, float scale, float reg_weight, "
        "int[] group_rows, int block_rows, bool need_src, bool need_trg) "
        "-> (Tensor loss, Tensor pos, Tensor neg_lse, Tensor sq, Tensor means, Tensor reg, Tensor dsrc, Tensor dtrg)");
  // One tile through a named version of the CPU epilogue (nce_cpu_epilogue.h; versions:
  // _C.epilogue_versions()), for the test of every version the CPU runs.
  m.def("epilogue_tile(Tensor a, Tensor pos_idx, int m0, int m1, int L, float? tclip, Tensor neg_lse, Tensor r, "
        "Tensor reg_coef, Tensor gpos, str version) -> (Tensor pos, Tensor shift, Tensor sum, Tensor sq, Tensor g)");
}

}  // namespace amdim_kernels

// _C.images_per_chunk(M, L, bytes_per_column, fill_columns, cols_per_tile, floor_bytes, parts) -> int:
// nce_shared.h's chunking rule, for the test that Python's agrees.
static PyObject* images_per_chunk(PyObject* /*module*/, PyObject* args) {
  long long m, l, bytes_per_column, fill_columns, cols_per_tile, floor_bytes, parts;
  if (!PyArg_ParseTuple(args, "LLLLLLL", &m, &l, &bytes_per_column, &fill_columns, &cols_per_tile, &floor_bytes,
                        &parts)) {
    return nullptr;
  }
  return PyLong_FromLongLong(amdim_kernels::images_per_chunk(m, l, bytes_per_column, fill_columns, cols_per_tile,
                                                             floor_bytes, parts));
}

// _C.epilogue_versions() -> tuple of str: the CPU epilogue's versions this CPU runs, best first.
static PyObject* epilogue_versions(PyObject* /*module*/, PyObject* /*unused*/) {
  const std::vector<std::string> versions = amdim_kernels::cpu::epilogue_versions();
  PyObject* out = PyTuple_New(static_cast<Py_ssize_t>(versions.size()));
  if (out == nullptr) return nullptr;
  for (size_t i = 0; i < versions.size(); ++i) {
    PyObject* name = PyUnicode_FromString(versions[i].c_str());
    if (name == nullptr) {
      Py_DECREF(out);
      return nullptr;
    }
    PyTuple_SET_ITEM(out, static_cast<Py_ssize_t>(i), name);
  }
  return out;
}

#ifdef AMDIM_WITH_CUDA
// _C.kernel_image_error(device: int) -> str: amdim_kernels::cuda_kernel_image_error.
static PyObject* kernel_image_error(PyObject* /*module*/, PyObject* arg) {
  const long long device = PyLong_AsLongLong(arg);
  if (device == -1 && PyErr_Occurred()) return nullptr;
  try {
    return PyUnicode_FromString(amdim_kernels::cuda_kernel_image_error(device).c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
    return nullptr;
  }
}
#endif

static PyMethodDef methods[] = {
    {"images_per_chunk", images_per_chunk, METH_VARARGS,
     "images_per_chunk(M, L, bytes_per_column, fill_columns, cols_per_tile, floor_bytes, parts) -> int: the "
     "chunking rule of the C++/CUDA kernels"},
    {"epilogue_versions", epilogue_versions, METH_NOARGS,
     "epilogue_versions() -> tuple[str, ...]: the CPU epilogue's versions this CPU runs, best first"},
#ifdef AMDIM_WITH_CUDA
    {"kernel_image_error", kernel_image_error, METH_O,
     "kernel_image_error(device) -> str: why that CUDA device cannot load this build's kernels, '' if it can"},
#endif
    {nullptr, nullptr, 0, nullptr}};

// A plain Python module (no pybind11): importing amdim_kernels._C loads the library above.
// BUILT_FOR names the devices this build has kernels for; SHARED_CONSTANTS the values of
// nce_shared.h; with CUDA kernels, kernel_image_error says whether a GPU can load them.
// The module's name is the one the build gives it (torch's build tools define
// TORCH_EXTENSION_NAME: _C, or _C_v1... where a process compiles the sources a second time).
#ifndef TORCH_EXTENSION_NAME
#define TORCH_EXTENSION_NAME _C
#endif
#define AMDIM_STRINGIFY_(x) #x
#define AMDIM_STRINGIFY(x) AMDIM_STRINGIFY_(x)
#define AMDIM_CONCAT_(a, b) a##b
#define AMDIM_CONCAT(a, b) AMDIM_CONCAT_(a, b)

extern "C" PyMODINIT_FUNC AMDIM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, AMDIM_STRINGIFY(TORCH_EXTENSION_NAME), nullptr, -1,
                                          methods};
  PyObject* module = PyModule_Create(&module_def);
  if (module == nullptr) return nullptr;
#ifdef AMDIM_WITH_CUDA
  PyObject* built_for = Py_BuildValue("(ss)", "cpu", "cuda");
#else
  PyObject* built_for = Py_BuildValue("(s)", "cpu");
#endif
  if (PyModule_AddObject(module, "BUILT_FOR", built_for) < 0) {
    Py_XDECREF(built_for);
    Py_DECREF(module);
    return nullptr;
  }
  using namespace amdim_kernels;
  PyObject* constants = Py_BuildValue("{s:L,s:L,s:L,s:L,s:d,s:i,s:i}", "CHUNK_PARTS", (long long)kChunkParts,
                                      "MIN_CHUNK_BYTES", (long long)kMinChunkBytes, "GRID_Y_MAX",
                                      (long long)kGridYMax, "CUDA_COLS_PER_BLOCK", (long long)kCudaColsPerBlock,
                                      "MAX_SHIFT_TCLIP", (double)kMaxShiftTclip, "SCALE_LOG2_TARGET",
                                      kScaleLog2Target, "SCALE_MAX_EXP", kScaleMaxExp);
  if (PyModule_AddObject(module, "SHARED_CONSTANTS", constants) < 0) {
    Py_XDECREF(constants);
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

// Python bindings of zerocomm._C. Blocking calls release the GIL so the CPU
// worker and other Python threads keep running.
#include <torch/csrc/DynamicTypes.h>
#include <torch/extension.h>

#include <optional>
#include <torch/csrc/distributed/c10d/Backend.hpp>

#include "communicator.h"
#include "flatten.h"
#include "scheduler.h"
#include "stream.h"

#ifdef ZEROCOMM_WITH_CUDA
#include <cuda_runtime_api.h>
#endif

#ifndef ZEROCOMM_TORCH_VERSION
#error "setup.py passes ZEROCOMM_TORCH_VERSION"
#endif

namespace py = pybind11;
using namespace zerocomm;

namespace {

py::dict build_info() {
  py::dict d;
#ifdef ZEROCOMM_WITH_CUDA
  d["cuda"] = true;
  d["cuda_version"] = std::to_string(CUDART_VERSION / 1000) + "." +
                      std::to_string(CUDART_VERSION % 1000 / 10);
  const int v = nccl_version();
  d["nccl_version"] = std::to_string(v / 10000) + "." +
                      std::to_string(v % 10000 / 100) + "." +
                      std::to_string(v % 100);
#else
  d["cuda"] = false;
  d["cuda_version"] = py::none();
  d["nccl_version"] = py::none();
#endif
  d["torch_version"] = ZEROCOMM_TORCH_VERSION;
  return d;
}

// [Note: native teardown without the GIL] A gloo thread that finishes a
// work drops its references to the work's tensors, and a tensor that has a
// Python object takes the GIL to release it (torch ties the Python object's
// life to the tensor's references). So whatever joins gloo's threads (the
// private backend's destructor), or waits for the comm worker that waits
// for gloo, must not hold the GIL: it would wait for a thread that waits
// for it -- a hang. And it must happen before interpreter exit: a thread
// that asks for the GIL then is ended by Python inside a noexcept
// destructor -- "terminate called without an active exception". Hence
// SyncScheduler.close() (called by the handle's close(), and at exit for
// handles left open) runs without the GIL, at a point close() decides,
// whatever Python references to the scheduler remain (a traceback's frames,
// a user's variable); and a scheduler that is only ever garbage-collected
// is destroyed without the GIL too, as torch destroys its process groups.
template <class T>
std::shared_ptr<T> deleted_without_gil(T* p) {
  return std::shared_ptr<T>(p, [](T* q) {
    if (PyGILState_Check()) {
      py::gil_scoped_release nogil;
      delete q;
    } else {
      delete q;
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "zerocomm native core: fused flatten, streams, collectives, "
      "sync scheduler";
  // Map c10's typed errors to the Python exceptions users expect, with the
  // message only (no C++ backtrace).
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::OutOfMemoryError& e) {
      // torch.OutOfMemoryError, so callers can catch it as from torch itself.
      // Looked up once and kept for the life of the process (never released:
      // exceptions can be translated during interpreter shutdown).
      static PyObject* oom =
          py::object(py::module_::import("torch").attr("OutOfMemoryError"))
              .release()
              .ptr();
      PyErr_SetString(oom, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  m.def("build_info", &build_info);
  // A bucket's collective (scheduler.h); only BROADCAST and REDUCE read the
  // bucket's root rank.
  py::enum_<Collective>(m, "Collective")
      .value("BROADCAST", Collective::kBroadcast)
      .value("ALL_GATHER", Collective::kAllGather)
      .value("REDUCE", Collective::kReduce)
      .value("REDUCE_SCATTER", Collective::kReduceScatter)
      .value("ALL_REDUCE", Collective::kAllReduce);
  m.attr("GLOO_BROADCAST_GATHER_MAX") = kGlooBroadcastGatherMax;

  py::class_<FlatLayout>(m, "FlatLayout")
      .def(py::init([](const std::vector<at::Tensor>& tensors,
                       int64_t align_bytes, int64_t pad_to) {
             return FlatLayout::for_tensors(tensors, align_bytes, pad_to);
           }),
           py::arg("tensors"), py::arg("align_bytes") = 16,
           py::arg("pad_to") = 1)
      .def_readonly("offsets", &FlatLayout::offsets)
      .def_readonly("numels", &FlatLayout::numels)
      .def_readonly("total_numel", &FlatLayout::total_numel)
      .def_readonly("align_bytes", &FlatLayout::align_bytes)
      .def_property_readonly(
          "dtype",
          [](const FlatLayout& l) {
            return py::reinterpret_borrow<py::object>(
                reinterpret_cast<PyObject*>(torch::getTHPDtype(l.dtype)));
          })
      .def("__len__", &FlatLayout::size)
      .def("__repr__", [](const FlatLayout& l) {
        return "FlatLayout(tensors=" + std::to_string(l.size()) +
               ", total_numel=" + std::to_string(l.total_numel) +
               ", align_bytes=" + std::to_string(l.align_bytes) + ")";
      });

  m.def(
      "flatten",
      [](const std::vector<at::Tensor>& tensors, const FlatLayout& layout,
         c10::optional<at::Tensor> out) {
        return flatten(tensors, layout, out.value_or(at::Tensor()));
      },
      py::arg("tensors"), py::arg("layout"), py::arg("out") = py::none(),
      py::call_guard<py::gil_scoped_release>());
  m.def("unflatten", &unflatten, py::arg("flat"), py::arg("tensors"),
        py::arg("layout"), py::call_guard<py::gil_scoped_release>());

  py::class_<Stream, std::shared_ptr<Stream>>(m, "Stream")
      .def_property_readonly("is_cuda", &Stream::is_cuda);
  m.def("make_stream", &make_stream, py::arg("cuda_device") = -1,
        py::arg("high_priority") = false);

  py::class_<Communicator, std::shared_ptr<Communicator>>(m, "Communicator")
      .def_property_readonly("rank", &Communicator::rank)
      .def_property_readonly("size", &Communicator::size)
      .def_property_readonly("name", &Communicator::name)
      .def_property_readonly("aborted", &Communicator::aborted)
      .def("check_error", &Communicator::check_error,
           py::call_guard<py::gil_scoped_release>())
      .def("abort", &Communicator::abort,
           py::call_guard<py::gil_scoped_release>());
  m.def("c10d_communicator", &make_c10d_communicator, py::arg("group"),
        py::arg("timeout_ms"));
  m.def("simulated_communicator", &make_simulated_communicator,
        py::arg("latency_us"), py::arg("bandwidth_gbps"),
        py::arg("modelled_world"), py::arg("shard_of") = 1);
  m.def(
      "simulated_charges",
      [](const std::shared_ptr<Communicator>& comm) {
        const SimulatedCharges c = simulated_charges(comm);
        py::dict d;
        d["collectives"] = c.collectives;
        d["seconds"] = c.seconds;
        d["wire_bytes"] = c.wire_bytes;
        return d;
      },
      py::arg("comm"));
#ifdef ZEROCOMM_WITH_CUDA
  m.def("nccl_unique_id", [] { return py::bytes(nccl_unique_id()); });
  m.def("nccl_communicator", &make_nccl_communicator, py::arg("unique_id"),
        py::arg("rank"), py::arg("size"), py::arg("device"),
        py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>());
#endif

  using S = SyncScheduler;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  py::class_<S, std::shared_ptr<S>>(m, "SyncScheduler")
      .def(
          py::init([](std::shared_ptr<Stream> stream,
                      std::shared_ptr<Communicator> comm, int64_t timeout_ms,
                      std::shared_ptr<Communicator> replica) {
            return deleted_without_gil(new S(std::move(stream), std::move(comm),
                                             timeout_ms, std::move(replica)));
          }),
          py::arg("stream"), py::arg("comm"), py::arg("timeout_ms"),
          py::arg("replica") = nullptr, nogil)
      .def("add_param_bucket", &S::add_param_bucket, py::arg("flat"),
           py::arg("root"), py::arg("label"),
           py::arg("collective") = Collective::kBroadcast)
      .def(
          "add_grad_bucket",
          [](S& s, at::Tensor flat, at::Tensor shard,
             std::vector<int64_t> offsets, std::vector<int64_t> numels,
             int root, std::string label, Collective op,
             std::optional<at::Tensor> replica) {
            return s.add_grad_bucket(std::move(flat), std::move(shard),
                                     std::move(offsets), std::move(numels),
                                     root, std::move(label), op,
                                     replica.value_or(at::Tensor()));
          },
          py::arg("flat"), py::arg("shard"), py::arg("offsets"),
          py::arg("numels"), py::arg("root"), py::arg("label"),
          py::arg("collective") = Collective::kReduce,
          py::arg("replica") = py::none())
      .def("launch", &S::launch, py::arg("order"), nogil)
      .def("wait_param", &S::wait_param, nogil)
      .def("reduce_grads", &S::reduce_grads, py::arg("bucket"),
           py::arg("grads"), py::arg("average"), nogil)
      .def("wait_grad", &S::wait_grad, nogil)
      .def("synchronize", &S::synchronize, nogil)
      .def("host_synchronize", &S::host_synchronize, nogil)
      .def("check", &S::check, nogil)
      .def("abort", &S::abort, nogil)
      .def("close", &S::close, nogil)
      .def_property_readonly("aborted", &S::aborted)
      .def("set_tracing", &S::set_tracing, nogil)
      .def("trace_begin", &S::trace_begin, nogil)
      .def("trace_end", &S::trace_end, nogil)
      .def("trace", &S::trace, nogil)
      .def("clear_trace", &S::clear_trace, nogil)
      .def("set_debug_delay", &S::set_debug_delay, py::arg("seconds"))
      .def_property_readonly("timeout_ms", &S::timeout_ms)
      .def_property_readonly("transport", &S::transport)
      .def("traffic", &S::traffic)
      .def_property_readonly("is_cuda", &S::is_cuda);
}

use std::path::{Path, PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_INCLUDE");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // Binaries find libtorch without LD_LIBRARY_PATH: embed a RUNPATH entry for the libtorch that
    // tools/setup.sh installed. LD_LIBRARY_PATH still wins, which is how a GPU machine substitutes
    // its own CUDA-enabled torch libraries for the same version.
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let root = Path::new(&libtorch);
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", root.join("lib").display());
    }
    compile_shims();
}

/// The C++ shims reach what tch does not expose: lib/optim/fused_adamw.cpp libtorch's
/// `_fused_adamw_`, lib/device_context.cpp its attention and determinism settings,
/// lib/zero/host.cpp exactly sized pinned tensors, lib/kernels/ops.cpp autograd functions. They are
/// compiled as tch's own C++ layer is (torch-sys's build script): the same headers, C++17, and
/// the same `_GLIBCXX_USE_CXX11_ABI`, so that the at::Tensor behind a tch handle has one layout
/// on both sides. libtorch itself is linked through torch-sys.
fn compile_shims() {
    let sources = ["lib/optim/fused_adamw.cpp", "lib/device_context.cpp", "lib/zero/host.cpp", "lib/kernels/ops.cpp"];
    let src = sources.join(", ");
    for s in sources {
        println!("cargo:rerun-if-changed={s}");
    }
    // torch-sys's `links = "tch"` metadata: the lib directory of the libtorch it found, however it
    // found it (LIBTORCH, LIBTORCH_USE_PYTORCH, a system install).
    let include_root = match std::env::var("LIBTORCH_INCLUDE") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => match std::env::var("DEP_TCH_LIBTORCH_LIB") {
            Ok(lib) => Path::new(&lib).parent().map(Path::to_path_buf).unwrap_or_default(),
            Err(_) => panic!(
                "building {src}: torch-sys did not report its libtorch (DEP_TCH_LIBTORCH_LIB is unset); \
                 set LIBTORCH to a libtorch 2.11 directory (`make build` installs one in .deps/libtorch)"
            ),
        },
    };
    let include = include_root.join("include");
    if !include.join("ATen/ops/_fused_adamw.h").is_file() {
        panic!(
            "building {src}: {} has no ATen/ops/_fused_adamw.h; LIBTORCH (or LIBTORCH_INCLUDE) must name a \
             libtorch 2.11 directory with its headers",
            include.display()
        );
    }
    // torch-sys's default, and what torch 2.11's wheels are built with.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        // libtorch's headers are not warning-clean; this file's own warnings are kept.
        .flag_if_supported("-Wno-unused-parameter")
        .files(sources)
        .compile("zerokit_shims");
}

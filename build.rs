// Binaries find libtorch without LD_LIBRARY_PATH: embed a RUNPATH entry for the libtorch that
// tools/setup.sh installed. LD_LIBRARY_PATH still wins, which is how a GPU machine substitutes
// its own CUDA-enabled torch libraries for the same version.
fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if let Ok(libtorch) = std::env::var("LIBTORCH") {
        let root = std::path::Path::new(&libtorch);
        let root = root.canonicalize().unwrap_or_else(|_| root.to_path_buf());
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", root.join("lib").display());
    }
}

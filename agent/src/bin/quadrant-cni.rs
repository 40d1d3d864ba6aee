//! `quadrant-cni`: the CNI plugin (`quadrant::cni`).

fn main() -> std::process::ExitCode {
    quadrant::cni::plugin::main()
}

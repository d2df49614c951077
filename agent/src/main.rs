use clap::Parser;
use wsgiscope::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    // `top` owns the terminal: no runtime, and no log lines over its screen.
    if let Command::Top(args) = &cli.command {
        exit(wsgiscope::top::run(args));
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build();
    let result = runtime.map_err(anyhow::Error::from).and_then(|rt| {
        rt.block_on(async {
            match cli.command {
                Command::Attach(args) => wsgiscope::commands::attach(args).await.map(|()| 0),
                Command::Run(args) => wsgiscope::commands::run(args).await,
                Command::Daemon(args) => wsgiscope::commands::daemon(args).await.map(|()| 0),
                Command::Top(_) => unreachable!("top runs before the runtime"),
            }
        })
    });
    exit(result);
}

fn exit(result: anyhow::Result<i32>) -> ! {
    match result {
        Ok(code) => std::process::exit(code),
        Err(err) => {
            eprintln!("wsgiscope: error: {err:#}");
            std::process::exit(1);
        }
    }
}

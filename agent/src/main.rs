use clap::Parser;
use wsgiscope::cli::{Cli, Command};

fn main() {
    let cli = Cli::parse();
    // `top` owns the terminal: no runtime, and no log lines over its screen.
    if let Command::Top(args) = &cli.command {
        exit(wsgiscope::top::run(args));
    }
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    // One thread: the loop that reads records and the HTTP server take turns. With a thread
    // pool, each 50 ms drain tick woke one thread to fire the timer and another to run the
    // loop; those wake-ups were ~15 % of the agent's CPU at 1k req/s (measured by hand).
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build();
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

//! The settings of every process of ours: flags, environment variables and an optional TOML
//! file, in one precedence order: **flag > environment > file > default**.
//!
//! - A setting is a long option of the process (of its subcommand for `saga-orchestrator serve`
//!   and `dev`; sagactl's global options). `--some-name` is also read from the environment
//!   variable `SAGA_SOME_NAME` (unless the option names another one) and from the key
//!   `some_name` (or `some-name`) of the file.
//! - The file is given with `--config FILE` or `SAGA_CONFIG`. Its keys are top-level (one file
//!   per process); a list sets a repeated option, `true` sets a switch.
//! - A bad setting stops the process at start with an error naming the setting and where its
//!   value came from: `--cache-mb`, `SAGA_CACHE_MB` or `cache_mb in FILE`; so do unknown keys.
//!   Checks made after parsing name the source with [`Sources::name`].
//!
//! Built on clap (the environment through `Arg::env`, precedence through
//! `ArgMatches::value_source`) and the `toml` crate; nothing here re-implements parsing.

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

use clap::error::{ContextKind, ContextValue};
use clap::parser::ValueSource;
use clap::{Arg, ArgAction, ArgMatches, Command, CommandFactory};

/// The option naming the file.
pub const CONFIG_ARG: &str = "config";
/// The environment variable naming the file.
pub const CONFIG_ENV: &str = "SAGA_CONFIG";
/// The prefix of every setting's environment variable.
pub const ENV_PREFIX: &str = "SAGA_";

/// Why the settings cannot be used.
#[derive(Debug)]
pub enum ConfigError {
    /// Clap's own answer (help, version, or a command line clap refused): print and exit with
    /// [`clap::Error::exit`].
    Clap(clap::Error),
    /// A setting from the environment or the file is wrong; the text names it and its source.
    Setting(String),
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ConfigError::Clap(error) => write!(f, "{}", first_line(error)),
            ConfigError::Setting(text) => f.write_str(text),
        }
    }
}

impl std::error::Error for ConfigError {}

/// Where each setting's value came from, to name it in later errors.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    names: HashMap<String, String>,
}

impl Sources {
    /// How to name setting `id` (a field name, `cache_mb`) in an error: `--cache-mb`,
    /// `SAGA_CACHE_MB`, `cache_mb in FILE`, or `--cache-mb (default)`.
    pub fn name(&self, id: &str) -> String {
        self.names
            .get(id)
            .cloned()
            .unwrap_or_else(|| format!("--{}", id.replace('_', "-")))
    }
}

/// The environment variable of option `--long`.
pub fn env_name(long: &str) -> String {
    format!("{ENV_PREFIX}{}", long.to_uppercase().replace('-', "_"))
}

/// Parses the process's settings (see the module): `T` from the command line, the environment
/// and the file. `scopes` are the subcommands whose options are settings (besides the
/// top-level ones). On an error prints it and exits (status 2, as clap does).
pub fn parse<T: clap::Parser>(scopes: &[&str]) -> (T, Sources) {
    match try_parse_from(std::env::args_os().collect(), scopes) {
        Ok(parsed) => parsed,
        Err(ConfigError::Clap(error)) => error.exit(),
        Err(ConfigError::Setting(text)) => {
            eprintln!("error: {text}");
            std::process::exit(2);
        }
    }
}

/// The command `T` with the environment variable of every setting and the `--config` option.
pub fn command<T: CommandFactory>(scopes: &[&str]) -> Command {
    let mut cmd = T::command().mut_args(with_env).arg(
        Arg::new(CONFIG_ARG)
            .long(CONFIG_ARG)
            .env(CONFIG_ENV)
            .value_name("FILE")
            .value_parser(clap::value_parser!(PathBuf))
            .global(true)
            .help("TOML file of settings (keys: the long options in snake_case); flags and environment variables win over it"),
    );
    for scope in scopes {
        cmd = cmd.mut_subcommand(scope, |sub| sub.mut_args(with_env));
    }
    // Copies the global options (`--log-format`, `--otlp-endpoint`) into the subcommands, so
    // a file's keys and the error names see them in every scope.
    cmd.build();
    cmd
}

fn with_env(arg: Arg) -> Arg {
    match arg.get_long() {
        Some(long) if arg.get_env().is_none() && !matches!(long, "help" | "version") => {
            let name = env_name(long);
            arg.env(name)
        }
        _ => arg,
    }
}

/// [`parse`] of `argv` (its first item is the program), returning errors.
pub fn try_parse_from<T: clap::Parser>(
    argv: Vec<OsString>,
    scopes: &[&str],
) -> Result<(T, Sources), ConfigError> {
    let cmd = command::<T>(scopes);
    // First pass, with nothing required (a required setting may come from the file): what the
    // command line and the environment give, and the file's name.
    let relaxed = relax(cmd.clone());
    let first = relaxed
        .clone()
        .try_get_matches_from(argv.clone())
        .map_err(|e| named_env(e, &cmd, &argv))?;
    let (leaf_cmd, leaf_matches) = leaf(&cmd, &first, scopes);
    let mut injected: Vec<(String, Vec<OsString>)> = Vec::new();
    let file: Option<PathBuf> = leaf_matches.get_one::<PathBuf>(CONFIG_ARG).cloned();
    if let Some(path) = &file {
        let file_source = match leaf_matches.value_source(CONFIG_ARG) {
            Some(ValueSource::EnvVariable) => format!("{CONFIG_ENV} {}", path.display()),
            _ => format!("--{CONFIG_ARG} {}", path.display()),
        };
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError::Setting(format!("{file_source}: cannot read: {e}")))?;
        let table: toml::Table = text
            .parse()
            .map_err(|e| ConfigError::Setting(format!("{file_source}: not TOML: {e}")))?;
        for (key, value) in &table {
            let id = key.replace('-', "_");
            let arg = leaf_cmd
                .get_arguments()
                .find(|a| a.get_id() == id.as_str() && a.get_long().is_some() && id != CONFIG_ARG)
                .ok_or_else(|| {
                    ConfigError::Setting(format!(
                        "{}: unknown setting `{key}` (settings: {})",
                        path.display(),
                        settings_list(leaf_cmd)
                    ))
                })?;
            if matches!(
                leaf_matches.value_source(&id),
                Some(ValueSource::CommandLine | ValueSource::EnvVariable)
            ) {
                continue;
            }
            let args = file_args(arg, value)
                .map_err(|why| ConfigError::Setting(format!("{id} in {}: {why}", path.display())))?;
            injected.push((id, args));
        }
    }
    let mut full = argv.clone();
    for (_, args) in &injected {
        full.extend(args.iter().cloned());
    }
    let matches = match cmd.clone().try_get_matches_from(full) {
        Ok(matches) => matches,
        Err(error) => {
            // Name the file's setting that clap refused, if it was one.
            for (id, args) in &injected {
                let mut one = argv.clone();
                one.extend(args.iter().cloned());
                if let Err(e) = relaxed.clone().try_get_matches_from(one) {
                    let path = file.as_deref().unwrap_or(Path::new("?"));
                    return Err(ConfigError::Setting(format!(
                        "{id} in {}: {}",
                        path.display(),
                        first_line(&e)
                    )));
                }
            }
            return Err(named_env(error, &cmd, &argv));
        }
    };
    let parsed = T::from_arg_matches(&matches).map_err(ConfigError::Clap)?;
    let (leaf_cmd, leaf_matches) = leaf(&cmd, &matches, scopes);
    let mut sources = Sources::default();
    for arg in leaf_cmd.get_arguments() {
        let (id, Some(long)) = (arg.get_id().as_str(), arg.get_long()) else {
            continue;
        };
        let name = if injected.iter().any(|(i, _)| i == id) {
            format!("{id} in {}", file.as_deref().unwrap_or(Path::new("?")).display())
        } else {
            match leaf_matches.value_source(id) {
                Some(ValueSource::EnvVariable) => arg
                    .get_env()
                    .map(|e| e.to_string_lossy().into_owned())
                    .unwrap_or_else(|| format!("--{long}")),
                Some(ValueSource::DefaultValue) => format!("--{long} (default)"),
                _ => format!("--{long}"),
            }
        };
        sources.names.insert(id.to_owned(), name);
    }
    Ok((parsed, sources))
}

/// `cmd` with no argument required (in every scope).
fn relax(cmd: Command) -> Command {
    let cmd = cmd.mut_args(|a| a.required(false));
    let names: Vec<String> = cmd.get_subcommands().map(|s| s.get_name().to_owned()).collect();
    names.iter().fold(cmd, |cmd, name| {
        cmd.mut_subcommand(name, |s| s.mut_args(|a| a.required(false)))
    })
}

/// The command and matches whose options are the settings: the subcommand run when it is one
/// of `scopes`, else the top level.
fn leaf<'a>(cmd: &'a Command, matches: &'a ArgMatches, scopes: &[&str]) -> (&'a Command, &'a ArgMatches) {
    if let Some((name, sub)) = matches.subcommand()
        && scopes.contains(&name)
        && let Some(sub_cmd) = cmd.find_subcommand(name)
    {
        return (sub_cmd, sub);
    }
    (cmd, matches)
}

fn settings_list(cmd: &Command) -> String {
    cmd.get_arguments()
        .filter_map(|a| a.get_long().map(|_| a.get_id().as_str()))
        .filter(|id| !matches!(*id, "help" | "version" | CONFIG_ARG))
        .collect::<Vec<_>>()
        .join(", ")
}

/// The command-line form of a file's `value` for `arg`.
fn file_args(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().expect("settings have a long option");
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        return match value {
            toml::Value::Boolean(true) => Ok(vec![format!("--{long}").into()]),
            toml::Value::Boolean(false) => Ok(Vec::new()),
            other => Err(format!("must be true or false, not a {}", other.type_str())),
        };
    }
    let one = |v: &toml::Value| -> Result<OsString, String> {
        let text = match v {
            toml::Value::String(s) => s.clone(),
            toml::Value::Integer(i) => i.to_string(),
            toml::Value::Float(f) => f.to_string(),
            toml::Value::Boolean(b) => b.to_string(),
            toml::Value::Datetime(d) => d.to_string(),
            toml::Value::Array(_) | toml::Value::Table(_) => {
                return Err(format!(
                    "must be a string, number or boolean, not a {}",
                    v.type_str()
                ));
            }
        };
        Ok(format!("--{long}={text}").into())
    };
    match value {
        toml::Value::Array(items) if matches!(arg.get_action(), ArgAction::Append) => {
            items.iter().map(one).collect()
        }
        other => Ok(vec![one(other)?]),
    }
}

/// A clap error about an option whose value came from the environment names the variable.
fn named_env(error: clap::Error, cmd: &Command, argv: &[OsString]) -> ConfigError {
    let Some(ContextValue::String(invalid)) = error.get(ContextKind::InvalidArg) else {
        return ConfigError::Clap(error);
    };
    let long = invalid
        .split_whitespace()
        .next()
        .and_then(|flag| flag.strip_prefix("--"))
        .unwrap_or_default();
    let on_command_line = argv.iter().any(|a| {
        a.to_str()
            .is_some_and(|a| a == format!("--{long}") || a.starts_with(&format!("--{long}=")))
    });
    let env = std::iter::once(cmd)
        .chain(cmd.get_subcommands())
        .flat_map(|c| c.get_arguments())
        .find(|a| a.get_long() == Some(long))
        .and_then(|a| a.get_env())
        .map(|e| e.to_string_lossy().into_owned());
    match env {
        Some(env) if !on_command_line && std::env::var_os(&env).is_some() => {
            ConfigError::Setting(format!("{env} (environment): {}", first_line(&error)))
        }
        _ => ConfigError::Clap(error),
    }
}

/// Clap's message (up to its first blank line, on one line) without its `error: ` prefix and
/// the usage after it.
fn first_line(error: &clap::Error) -> String {
    let text = error.render().to_string();
    let message: Vec<&str> = text
        .lines()
        .take_while(|line| !line.trim().is_empty())
        .map(str::trim)
        .collect();
    let message = message.join(" ");
    message.strip_prefix("error: ").unwrap_or(&message).to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Options with names no environment of a test run sets.
    #[derive(clap::Parser, Debug)]
    struct Settings {
        /// A required one.
        #[arg(long)]
        cfgtest_name: String,
        #[arg(long, default_value_t = 7)]
        cfgtest_count: u32,
        #[arg(long)]
        cfgtest_switch: bool,
        #[arg(long = "cfgtest-item")]
        cfgtest_items: Vec<String>,
    }

    fn argv(args: &[&str]) -> Vec<OsString> {
        std::iter::once("prog")
            .chain(args.iter().copied())
            .map(OsString::from)
            .collect()
    }

    fn file(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("writes");
        file
    }

    #[test]
    fn the_file_fills_what_the_command_line_does_not_give() {
        let f = file(
            "cfgtest_name = \"from-file\"\ncfgtest-count = 3\ncfgtest_switch = true\ncfgtest_items = [\"a\", \"b\"]\n",
        );
        let path = f.path().to_str().expect("utf-8");
        let (s, sources) = try_parse_from::<Settings>(argv(&["--config", path, "--cfgtest-count", "9"]), &[])
            .expect("parses");
        assert_eq!(s.cfgtest_name, "from-file");
        assert_eq!(s.cfgtest_count, 9, "the flag wins over the file");
        assert!(s.cfgtest_switch);
        assert_eq!(s.cfgtest_items, ["a", "b"]);
        assert_eq!(sources.name("cfgtest_count"), "--cfgtest-count");
        assert_eq!(sources.name("cfgtest_name"), format!("cfgtest_name in {path}"));
    }

    #[test]
    fn a_bad_or_unknown_setting_in_the_file_is_named_with_the_file() {
        let f = file("cfgtest_name = \"x\"\ncfgtest_count = \"many\"\n");
        let path = f.path().to_str().expect("utf-8");
        let error = try_parse_from::<Settings>(argv(&["--config", path]), &[])
            .expect_err("refused")
            .to_string();
        assert!(
            error.starts_with(&format!("cfgtest_count in {path}: ")),
            "{error}"
        );
        assert!(error.contains("many"), "{error}");

        let f = file("cfgtest_name = \"x\"\ncolour = 1\n");
        let path = f.path().to_str().expect("utf-8");
        let error = try_parse_from::<Settings>(argv(&["--config", path]), &[])
            .expect_err("refused")
            .to_string();
        assert!(error.contains("unknown setting `colour`"), "{error}");
        assert!(error.contains(path), "{error}");

        let f = file("cfgtest_name = [\n");
        let path = f.path().to_str().expect("utf-8");
        let error = try_parse_from::<Settings>(argv(&["--config", path]), &[])
            .expect_err("refused")
            .to_string();
        assert!(error.contains("not TOML"), "{error}");
    }

    #[test]
    fn every_setting_has_an_environment_variable_in_its_help() {
        let help = command::<Settings>(&[]).render_long_help().to_string();
        for env in ["SAGA_CFGTEST_NAME", "SAGA_CFGTEST_COUNT", "SAGA_CONFIG"] {
            assert!(help.contains(&format!("env: {env}")), "{env} in:\n{help}");
        }
    }

    #[test]
    fn without_a_file_a_missing_required_setting_is_clap_s_error() {
        let error = try_parse_from::<Settings>(argv(&[]), &[]).expect_err("refused");
        assert!(matches!(error, ConfigError::Clap(_)), "{error}");
        assert!(error.to_string().contains("--cfgtest-name"), "{error}");
    }
}

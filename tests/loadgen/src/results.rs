//! The one target every benchmark run must meet whatever the machine:
//! nothing lost, duplicated, failed or refused. `scripts/bench.sh` ends by
//! checking its results file with this (`loadgen check-results`), so a run
//! that lost a message fails the sitting instead of hiding among the
//! figures.

use std::io::BufRead;

use anyhow::Context;
use serde_json::{Value, json};

/// The counts of a run summary that must be zero.
const MUST_BE_ZERO: [&str; 4] = ["lost", "duplicated", "failed", "refused"];

/// What a results file holds, as far as correctness goes.
#[derive(Debug, Default, PartialEq)]
pub struct Verdict {
    /// Run summaries read (the sitting line and derived lines excluded).
    pub runs: usize,
    /// One line per non-zero count, naming the run.
    pub problems: Vec<String>,
    /// The file's own warnings (a plugin moved off the async workers):
    /// figures skewed, nothing lost.
    pub warnings: Vec<String>,
}

impl Verdict {
    /// True when at least one run was read and none lost anything.
    pub fn passed(&self) -> bool {
        self.runs > 0 && self.problems.is_empty()
    }

    pub fn summary(&self) -> Value {
        json!({
            "run": "check-results",
            "passed": self.passed(),
            "runs": self.runs,
            "problems": self.problems,
            "warnings": self.warnings,
        })
    }
}

/// Reads a results file (one JSON object per line, as `scripts/bench.sh`
/// writes it). Fails only on a line that is not a JSON object.
pub fn check(lines: impl BufRead) -> anyhow::Result<Verdict> {
    let mut verdict = Verdict::default();
    for (index, line) in lines.lines().enumerate() {
        let number = index + 1;
        let line = line.with_context(|| format!("reading line {number}"))?;
        if line.trim().is_empty() {
            continue;
        }
        let object: Value =
            serde_json::from_str(&line).with_context(|| format!("line {number} is not JSON"))?;
        let kind = object["run"]
            .as_str()
            .with_context(|| format!("line {number} has no \"run\" name"))?;
        match kind {
            // Where the figures come from, and ratios of runs read elsewhere.
            "sitting" | "chat-alternated" => continue,
            "warning" => {
                let text = object["text"].as_str().unwrap_or("(no text)");
                verdict.warnings.push(format!("line {number}: {text}"));
                continue;
            }
            _ => {}
        }
        verdict.runs += 1;
        let name = match object["target"].as_str().or(object["via"].as_str()) {
            Some(target) => format!("{kind} ({target})"),
            None => kind.to_owned(),
        };
        for count in MUST_BE_ZERO {
            match object.get(count).and_then(Value::as_u64) {
                Some(0) | None => {}
                Some(n) => verdict
                    .problems
                    .push(format!("line {number}: {name}: {count} {n}")),
            }
        }
    }
    Ok(verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SITTING: &str = r#"{"run":"sitting","commit":"abc","pairs":2}"#;
    const CHAT_CLEAN: &str = r#"{"run":"chat","target":"sockets","acked":10,"failed":0,"delivered":10,"lost":0,"duplicated":0}"#;
    const FANOUT_CLEAN: &str = r#"{"run":"fanout","target":"socketio","via":"http","refused":0,"received":5,"lost":0,"duplicated":0}"#;
    const RATIOS: &str = r#"{"run":"chat-alternated","pairs":2,"ratios":[1.5],"median_ratio":1.5}"#;

    fn verdict_of(lines: &[&str]) -> Verdict {
        check(lines.join("\n").as_bytes()).expect("the lines are JSON objects")
    }

    #[test]
    fn clean_runs_pass_and_derived_lines_are_not_counted_as_runs() {
        let verdict = verdict_of(&[SITTING, CHAT_CLEAN, FANOUT_CLEAN, RATIOS, ""]);
        assert_eq!(verdict.runs, 2);
        assert!(verdict.problems.is_empty(), "{:?}", verdict.problems);
        assert!(verdict.passed());
        assert_eq!(verdict.summary()["passed"], true);
    }

    #[test]
    fn every_non_zero_count_is_a_problem_naming_its_line_and_run() {
        let lossy_chat = r#"{"run":"chat","target":"sockets","failed":2,"lost":1,"duplicated":0}"#;
        let broker = r#"{"run":"broker","via":"rabbitmq","refused":0,"lost":0,"duplicated":3}"#;
        let idle = r#"{"run":"idle","target":"socketio","connections":50,"failed":4}"#;
        let verdict = verdict_of(&[SITTING, lossy_chat, CHAT_CLEAN, broker, idle]);
        assert_eq!(verdict.runs, 4);
        assert_eq!(
            verdict.problems,
            [
                "line 2: chat (sockets): lost 1",
                "line 2: chat (sockets): failed 2",
                "line 4: broker (rabbitmq): duplicated 3",
                "line 5: idle (socketio): failed 4",
            ]
        );
        assert!(!verdict.passed());
    }

    #[test]
    fn a_file_without_runs_does_not_pass() {
        let verdict = verdict_of(&[SITTING]);
        assert_eq!(verdict.runs, 0);
        assert!(!verdict.passed());
    }

    #[test]
    fn warnings_are_reported_without_failing() {
        let warning = r#"{"run":"warning","text":"a plugin ran off the async workers"}"#;
        let verdict = verdict_of(&[SITTING, CHAT_CLEAN, warning]);
        assert_eq!(
            verdict.warnings,
            ["line 3: a plugin ran off the async workers"]
        );
        assert!(verdict.passed());
    }

    #[test]
    fn a_line_that_is_not_a_run_summary_is_an_error() {
        let error = check("{\"run\":\"chat\"}\nnot json\n".as_bytes()).unwrap_err();
        assert!(error.to_string().contains("line 2"), "{error}");
        let error = check("{\"lost\":1}\n".as_bytes()).unwrap_err();
        assert!(error.to_string().contains("no \"run\""), "{error}");
    }
}

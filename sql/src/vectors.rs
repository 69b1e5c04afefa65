//! Exact vector search in SQL: `cosine_similarity(a, b)`, `dot_product(a, b)`
//! and `l2_distance(a, b)` over the lake's `embedding` column, e.g.
//!
//! ```sql
//! SELECT job_id, metadata['doc'] AS doc, cosine_similarity(embedding, [0.1, 0.2, …]) AS score
//! FROM results WHERE model = 'all-minilm-l6-v2' ORDER BY score DESC LIMIT 10
//! ```
//!
//! Each takes two vectors (list columns or array literals, of any numeric
//! element type) and returns a Float64: NULL when either vector is NULL or
//! holds a NULL, and for `cosine_similarity` when either has no length. Two
//! vectors of different lengths are an error naming both lengths: they come
//! from different models, and comparing them would mean nothing. They run
//! under the same tenant scope, time and memory bounds as every query.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, Float64Array, Float64Builder, ListArray};
use arrow::compute::cast;
use arrow::datatypes::Float64Type;
use arrow_schema::{DataType, Field};
use datafusion::common::{Result, ScalarValue, exec_err, plan_err};
use datafusion::logical_expr::{ColumnarValue, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility};

/// In the error of two vectors of different lengths: a caller's mistake,
/// not a failure of the query engine.
pub const MISMATCH: &str = "vectors of different dimensions";

/// The three functions, to register on a session.
pub fn udfs() -> Vec<ScalarUDF> {
    [Measure::Cosine, Measure::Dot, Measure::L2]
        .into_iter()
        .map(|measure| {
            ScalarUDF::new_from_impl(VectorFn { measure, signature: Signature::any(2, Volatility::Immutable) })
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Measure {
    Cosine,
    Dot,
    L2,
}

impl Measure {
    fn of(self, x: &[f64], y: &[f64]) -> Option<f64> {
        let dot = || x.iter().zip(y).map(|(a, b)| a * b).sum::<f64>();
        match self {
            Measure::Dot => Some(dot()),
            Measure::L2 => Some(x.iter().zip(y).map(|(a, b)| (a - b) * (a - b)).sum::<f64>().sqrt()),
            Measure::Cosine => {
                let norms = (x.iter().map(|a| a * a).sum::<f64>() * y.iter().map(|b| b * b).sum::<f64>()).sqrt();
                (norms > 0.0).then(|| dot() / norms)
            }
        }
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
struct VectorFn {
    measure: Measure,
    signature: Signature,
}

impl ScalarUDFImpl for VectorFn {
    fn name(&self) -> &str {
        match self.measure {
            Measure::Cosine => "cosine_similarity",
            Measure::Dot => "dot_product",
            Measure::L2 => "l2_distance",
        }
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        let vector = |t: &DataType| match t {
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => f.data_type().is_numeric(),
            DataType::Null => true,
            _ => false,
        };
        if arg_types.len() != 2 || !arg_types.iter().all(vector) {
            return plan_err!(
                "{} takes two vectors (list columns such as `embedding`, or literals such as [0.1, 0.2]), got {arg_types:?}",
                self.name()
            );
        }
        Ok(DataType::Float64)
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let [a, b] = args.args.as_slice() else {
            return exec_err!("{} takes two vectors", self.name());
        };
        let scalar = matches!((a, b), (ColumnarValue::Scalar(_), ColumnarValue::Scalar(_)));
        let (a, b) = (Side::of(a)?, Side::of(b)?);
        let rows = if scalar { 1 } else { args.number_rows };
        let mut out = Float64Builder::with_capacity(rows);
        for i in 0..rows {
            match (a.row(i), b.row(i)) {
                (Some(x), Some(y)) if x.len() != y.len() => {
                    return exec_err!(
                        "{}: {MISMATCH} ({} and {}; from different models?): compare vectors of one model",
                        self.name(),
                        x.len(),
                        y.len()
                    );
                }
                (Some(x), Some(y)) => out.append_option(self.measure.of(x, y)),
                _ => out.append_null(),
            }
        }
        let result: Float64Array = out.finish();
        Ok(match scalar {
            true => ColumnarValue::Scalar(ScalarValue::try_from_array(&result, 0)?),
            false => ColumnarValue::Array(Arc::new(result)),
        })
    }
}

/// One argument as lists of f64: a column (one vector per row) or a
/// constant (one vector for every row).
enum Side {
    Rows(ListArray),
    One(ListArray),
}

impl Side {
    fn of(v: &ColumnarValue) -> Result<Side> {
        let f64_list = |a: &ArrayRef| -> Result<ListArray> {
            let target = DataType::List(Arc::new(Field::new_list_field(DataType::Float64, true)));
            Ok(cast(a, &target)?.as_list::<i32>().clone())
        };
        Ok(match v {
            ColumnarValue::Array(a) => Side::Rows(f64_list(a)?),
            ColumnarValue::Scalar(s) => Side::One(f64_list(&s.to_array_of_size(1)?)?),
        })
    }

    /// Row `i`'s vector; `None` when it is NULL or holds a NULL.
    fn row(&self, i: usize) -> Option<&[f64]> {
        let (list, i) = match self {
            Side::Rows(l) => (l, i),
            Side::One(l) => (l, 0),
        };
        if list.is_null(i) {
            return None;
        }
        let offsets = list.value_offsets();
        let (from, to) = (offsets[i] as usize, offsets[i + 1] as usize);
        let values = list.values().as_primitive::<Float64Type>();
        if values.nulls().is_some_and(|n| (from..to).any(|j| n.is_null(j))) {
            return None;
        }
        Some(&values.values()[from..to])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Float32Builder, ListBuilder, RecordBatch, StringArray};
    use arrow_schema::Schema;
    use datafusion::prelude::SessionContext;

    async fn session() -> SessionContext {
        let ctx = SessionContext::new();
        for f in udfs() {
            ctx.register_udf(f);
        }
        let mut emb = ListBuilder::new(Float32Builder::new());
        for v in [Some(vec![1.0f32, 0.0]), Some(vec![0.0, 2.0]), Some(vec![1.0, 1.0]), None, Some(vec![0.0, 0.0])] {
            match v {
                Some(v) => {
                    emb.values().append_slice(&v);
                    emb.append(true);
                }
                None => emb.append(false),
            }
        }
        let emb = emb.finish();
        let ids = StringArray::from(vec!["x", "y", "xy", "none", "zero"]);
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("embedding", emb.data_type().clone(), true),
        ]));
        let batch = RecordBatch::try_new(schema, vec![Arc::new(ids), Arc::new(emb)]).unwrap();
        ctx.register_batch("v", batch).unwrap();
        ctx
    }

    async fn column(ctx: &SessionContext, sql: &str) -> Vec<(String, Option<f64>)> {
        let batches = ctx.sql(sql).await.unwrap().collect().await.unwrap();
        let mut out = Vec::new();
        for b in batches {
            let ids = b.column(0).as_string::<i32>();
            let scores = b.column(1).as_primitive::<Float64Type>();
            for i in 0..b.num_rows() {
                out.push((ids.value(i).to_owned(), scores.is_valid(i).then(|| scores.value(i))));
            }
        }
        out
    }

    fn close(got: Option<f64>, want: f64) -> bool {
        got.is_some_and(|g| (g - want).abs() < 1e-9)
    }

    #[tokio::test]
    async fn the_three_measures_against_a_literal_vector() {
        let ctx = session().await;
        let cos = column(&ctx, "SELECT id, cosine_similarity(embedding, [1.0, 0.0]) FROM v ORDER BY id").await;
        let dot = column(&ctx, "SELECT id, dot_product(embedding, [1, 2]) FROM v ORDER BY id").await;
        let l2 = column(&ctx, "SELECT id, l2_distance(embedding, [1.0, 0.0]) FROM v ORDER BY id").await;
        let by = |v: &[(String, Option<f64>)], id: &str| v.iter().find(|(i, _)| i == id).unwrap().1;
        assert!(close(by(&cos, "x"), 1.0) && close(by(&cos, "y"), 0.0), "{cos:?}");
        assert!(close(by(&cos, "xy"), std::f64::consts::FRAC_1_SQRT_2), "{cos:?}");
        assert_eq!(by(&cos, "none"), None, "a NULL vector has no score");
        assert_eq!(by(&cos, "zero"), None, "a zero vector has no direction");
        assert!(close(by(&dot, "x"), 1.0) && close(by(&dot, "y"), 4.0) && close(by(&dot, "xy"), 3.0), "{dot:?}");
        assert!(close(by(&l2, "x"), 0.0) && close(by(&l2, "y"), 5f64.sqrt()) && close(by(&l2, "zero"), 1.0), "{l2:?}");
    }

    #[tokio::test]
    async fn nearest_first_and_columns_against_columns() {
        let ctx = session().await;
        let top = column(
            &ctx,
            "SELECT id, cosine_similarity(embedding, [0.9, 0.1]) AS s FROM v WHERE embedding IS NOT NULL \
             ORDER BY s DESC NULLS LAST LIMIT 2",
        )
        .await;
        assert_eq!(top.iter().map(|(i, _)| i.as_str()).collect::<Vec<_>>(), ["x", "xy"]);
        let itself = column(&ctx, "SELECT id, cosine_similarity(embedding, embedding) FROM v WHERE id = 'y'").await;
        assert!(close(itself[0].1, 1.0), "{itself:?}");
    }

    #[tokio::test]
    async fn vectors_of_other_lengths_or_no_vectors_are_clear_errors() {
        let ctx = session().await;
        let err = ctx.sql("SELECT cosine_similarity(embedding, [1.0, 0.0, 0.0]) FROM v").await.unwrap();
        let err = err.collect().await.unwrap_err().to_string();
        assert!(err.contains("vectors of different dimensions (2 and 3"), "{err}");
        let err = match ctx.sql("SELECT l2_distance(id, [1.0]) FROM v").await {
            Ok(df) => df.collect().await.unwrap_err().to_string(),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("l2_distance takes two vectors"), "{err}");
    }
}

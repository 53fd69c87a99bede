package mongostore

import (
	"errors"
	"math"
	"slices"
	"strconv"
	"strings"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/x/bsonx/bsoncore"
)

// MarshalBSON encodes d as the driver's reflection encoder does from its
// bson tags, without reflection: every billed request writes one row.
// TestLogDocBSONIsTheDriversEncoding compares the two on every field; the
// keys of TakenNano are written sorted (the driver writes them in map
// order, which is random).
func (d *logDoc) MarshalBSON() ([]byte, error) {
	idx, b := bsoncore.AppendDocumentStart(make([]byte, 0, 640))
	b = bsoncore.AppendObjectIDElement(b, "_id", d.ID)
	b = appendStringOmitEmpty(b, "userId", d.UserID)
	b = bsoncore.AppendStringElement(b, "userKeyId", d.UserKeyID)
	b = appendStringOmitEmpty(b, "trollKeyId", d.TrollKeyID)
	b = bsoncore.AppendStringElement(b, "model", d.Model)
	b = bsoncore.AppendInt64Element(b, "inputTokens", d.InputTokens)
	b = bsoncore.AppendInt64Element(b, "outputTokens", d.OutputTokens)
	b = bsoncore.AppendInt64Element(b, "cacheWriteTokens", d.CacheWriteTokens)
	b = bsoncore.AppendInt64Element(b, "cacheHitTokens", d.CacheHitTokens)
	b = bsoncore.AppendDoubleElement(b, "creditsCost", d.CreditsCost)
	b = bsoncore.AppendStringElement(b, "creditType", d.CreditType)
	b = bsoncore.AppendInt64Element(b, "tokensUsed", d.TokensUsed)
	b = appendInt(b, "statusCode", d.StatusCode)
	b = bsoncore.AppendInt64Element(b, "latencyMs", d.LatencyMs)
	b = bsoncore.AppendBooleanElement(b, "isSuccess", d.IsSuccess)
	b = bsoncore.AppendDateTimeElement(b, "createdAt", int64(bson.NewDateTimeFromTime(d.CreatedAt)))
	b = appendStringOmitEmpty(b, "friendKeyId", d.FriendKeyID)
	b = bsoncore.AppendStringElement(b, "requestId", d.RequestID)
	b = bsoncore.AppendStringElement(b, "creditField", d.CreditField)
	b = bsoncore.AppendStringElement(b, "endpoint", d.Endpoint)
	b = bsoncore.AppendBooleanElement(b, "stream", d.Stream)
	b = bsoncore.AppendStringElement(b, "upstreamModel", d.UpstreamModel)
	b = bsoncore.AppendStringElement(b, "usageSource", d.UsageSource)
	b = bsoncore.AppendStringElement(b, "endReason", d.EndReason)
	b = bsoncore.AppendInt64Element(b, "costNano", d.CostNano)
	b = bsoncore.AppendInt64Element(b, "chargedNano", d.ChargedNano)
	b = bsoncore.AppendDoubleElement(b, "shortfall", d.Shortfall)
	b = bsoncore.AppendInt64Element(b, "shortfallNano", d.ShortfallNano)
	b = bsoncore.AppendInt64Element(b, "holdNano", d.HoldNano)
	b, err := appendCounts(b, "takenNano", d.TakenNano)
	if err != nil {
		return nil, err
	}
	if b, err = appendAttempts(b, d.Attempts); err != nil {
		return nil, err
	}
	return bsoncore.AppendDocumentEnd(b, idx)
}

func appendStringOmitEmpty(b []byte, key, v string) []byte {
	if v == "" {
		return b
	}
	return bsoncore.AppendStringElement(b, key, v)
}

// appendInt writes a Go int as the driver does: int32 when it fits.
func appendInt(b []byte, key string, v int) []byte {
	if v >= math.MinInt32 && v <= math.MaxInt32 {
		return bsoncore.AppendInt32Element(b, key, int32(v))
	}
	return bsoncore.AppendInt64Element(b, key, int64(v))
}

// appendCounts writes m as an embedded document (null when nil), its keys
// sorted.
func appendCounts(b []byte, key string, m map[string]int64) ([]byte, error) {
	if m == nil {
		return bsoncore.AppendNullElement(b, key), nil
	}
	keys := make([]string, 0, len(m))
	for k := range m {
		if strings.IndexByte(k, 0) >= 0 {
			return nil, errors.New("mongostore: a map key contains a NUL byte")
		}
		keys = append(keys, k)
	}
	slices.Sort(keys)
	b = bsoncore.AppendHeader(b, bsoncore.TypeEmbeddedDocument, key)
	idx, b := bsoncore.AppendDocumentStart(b)
	for _, k := range keys {
		b = bsoncore.AppendInt64Element(b, k, m[k])
	}
	return bsoncore.AppendDocumentEnd(b, idx)
}

// appendAttempts writes the attempts array, left out when empty.
func appendAttempts(b []byte, as []attemptDoc) ([]byte, error) {
	if len(as) == 0 {
		return b, nil
	}
	b = bsoncore.AppendHeader(b, bsoncore.TypeArray, "attempts")
	aidx, b := bsoncore.AppendArrayStart(b)
	for i, a := range as {
		b = bsoncore.AppendHeader(b, bsoncore.TypeEmbeddedDocument, strconv.Itoa(i))
		idx, d := bsoncore.AppendDocumentStart(b)
		d = bsoncore.AppendStringElement(d, "keyId", a.KeyID)
		d = appendInt(d, "status", a.Status)
		d = bsoncore.AppendStringElement(d, "reason", a.Reason)
		d = bsoncore.AppendInt64Element(d, "latencyMs", a.LatencyMs)
		var err error
		if b, err = bsoncore.AppendDocumentEnd(d, idx); err != nil {
			return nil, err
		}
	}
	return bsoncore.AppendArrayEnd(b, aidx)
}

package mongostore

import (
	"context"

	"go.mongodb.org/mongo-driver/v2/bson"
	"go.mongodb.org/mongo-driver/v2/mongo"
	"go.mongodb.org/mongo-driver/v2/mongo/options"
)

// scanPage is how many documents one query of findPages reads.
const scanPage = 256

// findPages reads every document of coll matching filter, by increasing
// _id, in single-batch queries of at most scanPage documents each, and
// returns them decoded; id gives a decoded document's _id.
//
// The server keeps no cursor between two queries. FerretDB keeps a
// PostgreSQL connection for every open cursor, until it is exhausted or
// killed: a scan of more than one batch whose client gave up half way (its
// context ended under load) left its connection taken for the cursor's
// ten-minute life, and a few such scans left FerretDB no connection for any
// command. A page cut short by the 16 MiB reply limit is not mistaken for
// the end: the scan ends on an empty page.
func findPages[T any](ctx context.Context, coll *mongo.Collection, filter bson.D, projection bson.D, id func(*T) any) ([]T, error) {
	var all []T
	var after any
	for {
		f := filter
		if after != nil {
			f = bson.D{{Key: "$and", Value: bson.A{filter, bson.D{{Key: "_id", Value: bson.D{{Key: "$gt", Value: after}}}}}}}
		}
		opts := options.Find().SetSort(bson.D{{Key: "_id", Value: 1}}).SetLimit(-scanPage).SetBatchSize(scanPage) // negative: one batch, no cursor
		if projection != nil {
			opts.SetProjection(projection)
		}
		cur, err := coll.Find(ctx, f, opts)
		if err != nil {
			return nil, err
		}
		var page []T
		if err := cur.All(ctx, &page); err != nil {
			return nil, err
		}
		if len(page) == 0 {
			return all, nil
		}
		all = append(all, page...)
		after = id(&page[len(page)-1])
	}
}
